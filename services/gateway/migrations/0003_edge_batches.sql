-- Batches of edge traffic applied to a project (POST /v1/sync/batches): a batch id seen here is
-- answered as a duplicate without recording or charging its traces again. Kept with the project.
CREATE TABLE edge_batches (
    project_id text        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    batch_id   text        NOT NULL,
    traces     bigint      NOT NULL,
    applied_at timestamptz NOT NULL,
    PRIMARY KEY (project_id, batch_id)
);
