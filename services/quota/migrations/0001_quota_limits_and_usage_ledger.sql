-- Per-scope limit overrides; a scope without a row uses the configured defaults. 0 = unlimited.
CREATE TABLE quota_limits (
    scope_kind          text        NOT NULL CHECK (scope_kind IN ('org', 'project', 'user', 'key')),
    scope_id            text        NOT NULL CHECK (scope_id <> ''),
    tokens_per_day      bigint      NOT NULL DEFAULT 0 CHECK (tokens_per_day >= 0),
    cost_micros_per_day bigint      NOT NULL DEFAULT 0 CHECK (cost_micros_per_day >= 0),
    requests_per_minute bigint      NOT NULL DEFAULT 0 CHECK (requests_per_minute >= 0),
    tokens_per_minute   bigint      NOT NULL DEFAULT 0 CHECK (tokens_per_minute >= 0),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope_kind, scope_id)
);

-- Committed usage per scope per day (the UTC day the reservation was made on), written from the
-- hot counters in batches. Values only grow: the writer keeps the greatest value it has seen.
CREATE TABLE usage_ledger (
    scope_kind  text        NOT NULL CHECK (scope_kind IN ('org', 'project', 'user', 'key')),
    scope_id    text        NOT NULL,
    day         date        NOT NULL,
    tokens      bigint      NOT NULL DEFAULT 0,
    cost_micros bigint      NOT NULL DEFAULT 0,
    requests    bigint      NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope_kind, scope_id, day)
);

CREATE INDEX usage_ledger_day_idx ON usage_ledger (day);
