CREATE TABLE export_cursors (
    name        TEXT    PRIMARY KEY,
    position    INTEGER NOT NULL DEFAULT 0,
    owner       TEXT    NOT NULL DEFAULT '',
    lease_until INTEGER NOT NULL DEFAULT 0,
    exported    INTEGER NOT NULL DEFAULT 0
)
