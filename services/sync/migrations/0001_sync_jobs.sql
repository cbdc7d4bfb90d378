-- The durable outbound queue: one row per job, claimed by workers with FOR UPDATE SKIP LOCKED.
CREATE TABLE sync_jobs (
    id               uuid        PRIMARY KEY,
    org_id           text        NOT NULL,
    project_id       text        NOT NULL,
    user_id          text        NOT NULL DEFAULT '',
    key_id           text        NOT NULL DEFAULT '',
    -- The caller's idempotency key; '' when none was given.
    idempotency_key  text        NOT NULL DEFAULT '',
    -- SHA-256 of the request (request id and timeout excluded): a reused key must carry the same request.
    request_hash     text        NOT NULL,
    -- The meshgate.sync.v1.CompleteRequest, protobuf-encoded.
    request          bytea       NOT NULL,
    -- meshgate.sync.v1.JobStatus: 1 queued, 2 running, 3 succeeded, 4 dead.
    status           smallint    NOT NULL CHECK (status BETWEEN 1 AND 4),
    attempts         integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL CHECK (max_attempts > 0),
    last_error       text        NOT NULL DEFAULT '',
    last_error_code  text        NOT NULL DEFAULT '',
    -- The delivery's outcome (text, usage, tool calls...), protobuf-encoded; set when succeeded.
    outcome          bytea,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    next_attempt_at  timestamptz NOT NULL,
    -- A running job belongs to the worker holding lease_token until lease_until; past it, the
    -- worker is presumed dead and the job is claimed again.
    lease_until      timestamptz,
    lease_token      uuid,
    finished_at      timestamptz
);

CREATE UNIQUE INDEX sync_jobs_idempotency ON sync_jobs (project_id, idempotency_key) WHERE idempotency_key <> '';
CREATE INDEX sync_jobs_due ON sync_jobs (next_attempt_at) WHERE status = 1;
CREATE INDEX sync_jobs_leases ON sync_jobs (lease_until) WHERE status = 2;
CREATE INDEX sync_jobs_project ON sync_jobs (project_id, created_at DESC);
CREATE INDEX sync_jobs_finished ON sync_jobs (finished_at) WHERE status = 3;
