-- Per-project security policy and request limits, read by every gateway replica (cached, and
-- invalidated over Redis when they change). `{}` means the defaults: the policy crate's default
-- rules (secrets and sensitive PII redacted, e-mail flagged, keywords, destructive shell and
-- prompt injection blocked) and the gateway's configured request limits.
-- The older `policy` column stays the project's routing policy.
ALTER TABLE projects
    ADD COLUMN security_policy jsonb NOT NULL DEFAULT '{}'::jsonb
        CHECK (jsonb_typeof(security_policy) = 'object'),
    ADD COLUMN request_limits  jsonb NOT NULL DEFAULT '{}'::jsonb
        CHECK (jsonb_typeof(request_limits) = 'object');
