-- Console sessions signed out before their access token expired: the
-- session itself travels sealed in the browser, so every replica checks
-- here. Rows go once the token would have expired anyway.
CREATE TABLE console_logouts (
    id      TEXT    PRIMARY KEY,
    until   BIGINT  NOT NULL
)
