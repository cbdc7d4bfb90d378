-- One row per request, partitioned by day on started_at. Partitions are created by the service
-- (today ± N days ahead of time, and on demand for a batch with a day that has none); retention
-- drops whole partitions.
CREATE TABLE request_traces (
    started_at        timestamptz NOT NULL,
    org_id            text        NOT NULL,
    request_id        text        NOT NULL,
    trace_id          text        NOT NULL DEFAULT '',
    project_id        text        NOT NULL DEFAULT '',
    user_id           text        NOT NULL DEFAULT '',
    key_id            text        NOT NULL DEFAULT '',
    requested_model   text        NOT NULL DEFAULT '',
    served_model      text        NOT NULL DEFAULT '',
    served_target     text        NOT NULL DEFAULT '',
    -- "l0".."l3", or '' when unknown.
    layer             text        NOT NULL DEFAULT '',
    prompt_tokens     bigint      NOT NULL DEFAULT 0,
    completion_tokens bigint      NOT NULL DEFAULT 0,
    total_tokens      bigint      NOT NULL DEFAULT 0,
    cost_micros       bigint      NOT NULL DEFAULT 0,
    latency_us        bigint      NOT NULL DEFAULT 0,
    status_code       integer     NOT NULL DEFAULT 0,
    error_code        text        NOT NULL DEFAULT '',
    stream            boolean     NOT NULL DEFAULT false,
    -- The model that answered, else the one asked for: what "by model" means in every query.
    model             text        GENERATED ALWAYS AS (
                          CASE WHEN served_model <> '' THEN served_model ELSE requested_model END
                      ) STORED,
    is_error          boolean     GENERATED ALWAYS AS (status_code >= 400 OR error_code <> '') STORED,
    -- The full meshgate.analytics.v1.Trace as received.
    trace             bytea       NOT NULL,
    -- A unique key on a partitioned table must contain the partition key.
    PRIMARY KEY (started_at, org_id, request_id)
) PARTITION BY RANGE (started_at);

CREATE INDEX request_traces_org_started_idx ON request_traces (org_id, started_at);

-- Idempotency and lookup by request id across partitions: one row per (org, request id), which
-- also tells GetTrace which partition to read.
CREATE TABLE trace_ids (
    org_id     text        NOT NULL,
    request_id text        NOT NULL,
    started_at timestamptz NOT NULL,
    PRIMARY KEY (org_id, request_id)
);

CREATE INDEX trace_ids_started_at_idx ON trace_ids (started_at);
