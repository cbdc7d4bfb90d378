-- The quota reservation a job was admitted with, held while it waits: delivery commits it, a dead
-- letter releases it. Jobs queued before reservations were kept have none ('') and are charged
-- through Quota.Charge when delivered.
ALTER TABLE sync_jobs
    ADD COLUMN reservation_id       text    NOT NULL DEFAULT '',
    ADD COLUMN reserved_tokens      bigint  NOT NULL DEFAULT 0,
    ADD COLUMN reserved_cost_micros bigint  NOT NULL DEFAULT 0,
    -- The reservation still holds budget (and must be committed or released).
    ADD COLUMN reservation_open     boolean NOT NULL DEFAULT false;

-- Dead letters whose reservation is still to be released, found by the workers' sweep.
CREATE INDEX sync_jobs_open_dead_reservations ON sync_jobs (updated_at) WHERE status = 4 AND reservation_open;
