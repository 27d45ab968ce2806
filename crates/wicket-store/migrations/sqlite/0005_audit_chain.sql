ALTER TABLE events ADD COLUMN chain_index INTEGER;
ALTER TABLE events ADD COLUMN hash BLOB;
CREATE INDEX events_chain ON events (session_id, chain_index);

ALTER TABLE sessions ADD COLUMN chain_len INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN chain_head BLOB;
ALTER TABLE sessions ADD COLUMN rooted_len INTEGER NOT NULL DEFAULT 0;

CREATE TABLE audit_seals (
    session_id  TEXT    PRIMARY KEY,
    len         INTEGER NOT NULL,
    head        BLOB    NOT NULL,
    sealed_at   INTEGER NOT NULL,
    signature   BLOB    NOT NULL,
    key_id      TEXT    NOT NULL
);

CREATE TABLE audit_roots (
    seq         INTEGER PRIMARY KEY,
    created_at  INTEGER NOT NULL,
    prev        BLOB    NOT NULL,
    root        BLOB    NOT NULL,
    leaves      INTEGER NOT NULL,
    signature   BLOB    NOT NULL,
    key_id      TEXT    NOT NULL
);

CREATE TABLE audit_root_leaves (
    root_seq    INTEGER NOT NULL,
    session_id  TEXT    NOT NULL,
    len         INTEGER NOT NULL,
    head        BLOB    NOT NULL,
    PRIMARY KEY (root_seq, session_id)
);
CREATE INDEX audit_root_leaves_session ON audit_root_leaves (session_id)
