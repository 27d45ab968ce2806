-- Approvals that also cover later requests with the same statement
-- fingerprint (or command), principal, connection and rule, for a while.
ALTER TABLE approvals ADD COLUMN reuse_key TEXT NOT NULL DEFAULT '';
ALTER TABLE approvals ADD COLUMN reuse_until BIGINT;
CREATE INDEX approvals_reuse ON approvals (reuse_key, reuse_until);
