-- Keys the control service holds (the SSH user CA), shared by its replicas.
CREATE TABLE keys (
    name        TEXT    PRIMARY KEY,
    secret      TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
);
