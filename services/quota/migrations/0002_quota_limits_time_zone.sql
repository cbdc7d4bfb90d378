-- The IANA time zone of an organization's daily window (NULL = UTC); only org rows carry one.
ALTER TABLE quota_limits
    ADD COLUMN time_zone text CHECK (time_zone IS NULL OR (scope_kind = 'org' AND time_zone <> ''));
