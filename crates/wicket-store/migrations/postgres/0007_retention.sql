ALTER TABLE sessions ADD COLUMN hold TEXT NOT NULL DEFAULT '';
CREATE INDEX sessions_ended ON sessions (connection, ended_at);

CREATE TABLE audit_deletions (
    session_id  TEXT    PRIMARY KEY,
    len         BIGINT NOT NULL,
    head        BYTEA    NOT NULL,
    deleted_at  BIGINT NOT NULL,
    reason      TEXT    NOT NULL,
    signature   BYTEA    NOT NULL,
    key_id      TEXT    NOT NULL
)
