-- Just-in-time access grants: approved access requests, each for one
-- principal on one connection until a set time.
CREATE TABLE access_grants (
    id          TEXT    PRIMARY KEY,
    approval_id TEXT    NOT NULL,
    issuer      TEXT    NOT NULL,
    subject     TEXT    NOT NULL,
    label       TEXT    NOT NULL,
    connection  TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    granted_at  BIGINT  NOT NULL,
    until       BIGINT  NOT NULL
);
CREATE INDEX access_grants_connection ON access_grants (connection, until);
