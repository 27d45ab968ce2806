ALTER TABLE events ADD COLUMN chain_index BIGINT;
ALTER TABLE events ADD COLUMN hash BYTEA;
CREATE INDEX events_chain ON events (session_id, chain_index);

ALTER TABLE sessions ADD COLUMN chain_len BIGINT NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN chain_head BYTEA;
ALTER TABLE sessions ADD COLUMN rooted_len BIGINT NOT NULL DEFAULT 0;

CREATE TABLE audit_seals (
    session_id  TEXT    PRIMARY KEY,
    len         BIGINT NOT NULL,
    head        BYTEA    NOT NULL,
    sealed_at   BIGINT NOT NULL,
    signature   BYTEA    NOT NULL,
    key_id      TEXT    NOT NULL
);

CREATE TABLE audit_roots (
    seq         BIGINT PRIMARY KEY,
    created_at  BIGINT NOT NULL,
    prev        BYTEA    NOT NULL,
    root        BYTEA    NOT NULL,
    leaves      BIGINT NOT NULL,
    signature   BYTEA    NOT NULL,
    key_id      TEXT    NOT NULL
);

CREATE TABLE audit_root_leaves (
    root_seq    BIGINT NOT NULL,
    session_id  TEXT    NOT NULL,
    len         BIGINT NOT NULL,
    head        BYTEA    NOT NULL,
    PRIMARY KEY (root_seq, session_id)
);
CREATE INDEX audit_root_leaves_session ON audit_root_leaves (session_id)
