ALTER TABLE sessions ADD COLUMN hold TEXT NOT NULL DEFAULT '';
CREATE INDEX sessions_ended ON sessions (connection, ended_at);

CREATE TABLE audit_deletions (
    session_id  TEXT    PRIMARY KEY,
    len         INTEGER NOT NULL,
    head        BLOB    NOT NULL,
    deleted_at  INTEGER NOT NULL,
    reason      TEXT    NOT NULL,
    signature   BLOB    NOT NULL,
    key_id      TEXT    NOT NULL
)
