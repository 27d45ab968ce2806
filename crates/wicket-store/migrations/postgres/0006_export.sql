ALTER TABLE events ADD COLUMN pos BIGSERIAL;
CREATE UNIQUE INDEX events_pos ON events (pos);

CREATE TABLE export_cursors (
    name        TEXT    PRIMARY KEY,
    position    BIGINT  NOT NULL DEFAULT 0,
    owner       TEXT    NOT NULL DEFAULT '',
    lease_until BIGINT  NOT NULL DEFAULT 0,
    exported    BIGINT  NOT NULL DEFAULT 0
)
