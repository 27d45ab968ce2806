CREATE TABLE policies (
    version     BIGINT PRIMARY KEY,
    document    TEXT    NOT NULL,
    sha256      TEXT    NOT NULL,
    applied_by  TEXT    NOT NULL,
    applied_at  BIGINT NOT NULL
);

CREATE TABLE sessions (
    id                TEXT    PRIMARY KEY,
    connection        TEXT    NOT NULL,
    principal         TEXT    NOT NULL,
    principal_subject TEXT    NOT NULL,
    started_at        BIGINT NOT NULL,
    ended_at          BIGINT,
    state             TEXT    NOT NULL,
    end_reason        TEXT    NOT NULL DEFAULT '',
    command_count     BIGINT NOT NULL DEFAULT 0,
    client_addr       TEXT    NOT NULL DEFAULT '',
    client_app        TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX sessions_started ON sessions (started_at);

CREATE TABLE events (
    id          TEXT    PRIMARY KEY,
    session_id  TEXT    NOT NULL,
    seq         BIGINT NOT NULL,
    time        BIGINT NOT NULL,
    kind        TEXT    NOT NULL,
    connection  TEXT    NOT NULL,
    body        TEXT    NOT NULL
);
CREATE INDEX events_session ON events (session_id, seq);

CREATE TABLE approvals (
    id          TEXT    PRIMARY KEY,
    request_id  TEXT    NOT NULL UNIQUE,
    rev         BIGINT NOT NULL,
    state       TEXT    NOT NULL,
    body        TEXT    NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX approvals_state ON approvals (state, created_at);

CREATE TABLE revocations (
    issuer      TEXT    NOT NULL,
    subject     TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    revoked_at  BIGINT NOT NULL,
    until       BIGINT,
    PRIMARY KEY (issuer, subject)
);

CREATE TABLE sidecars (
    id          TEXT    PRIMARY KEY,
    name        TEXT    NOT NULL,
    connections TEXT    NOT NULL,
    secret_hash TEXT    NOT NULL,
    created_at  BIGINT NOT NULL,
    revoked     BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE traces (
    trace_id    TEXT    PRIMARY KEY,
    body        TEXT    NOT NULL,
    updated_at  BIGINT NOT NULL
);
