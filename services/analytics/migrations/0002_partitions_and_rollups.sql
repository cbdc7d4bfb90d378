-- Traces keep every field of the richer Trace (task, risk, routing reasons, tool calls, sanitized
-- headers); model calls and policy findings get day-partitioned tables of their own; rollups per
-- hour and per day answer aggregations without reading raw rows.
--
-- Idempotency is now the primary key (started_at, org_id, request_id): a re-sent trace carries
-- the start time it was made with. The unpartitioned trace_ids lookup is gone because retention
-- could only have cleared it with DELETE; GetTrace finds a request id through the per-partition
-- index (org_id, request_id).
DROP TABLE trace_ids;

ALTER TABLE request_traces
    ADD COLUMN task            text    NOT NULL DEFAULT '',
    ADD COLUMN risk_score      integer NOT NULL DEFAULT 0,
    ADD COLUMN routing_reason  text    NOT NULL DEFAULT '',
    ADD COLUMN routing_reasons jsonb   NOT NULL DEFAULT '[]',
    ADD COLUMN tool_calls      jsonb   NOT NULL DEFAULT '[]',
    ADD COLUMN headers         jsonb   NOT NULL DEFAULT '{}';

CREATE INDEX request_traces_request_idx ON request_traces (org_id, request_id);
-- TopExpensive: a top-N per partition merged, without sorting the window.
CREATE INDEX request_traces_cost_idx ON request_traces (org_id, cost_micros DESC, started_at DESC);

-- Every model or provider call of a request, fallbacks included, in order (seq from 0).
CREATE TABLE model_calls (
    started_at        timestamptz NOT NULL,
    org_id            text        NOT NULL,
    request_id        text        NOT NULL,
    seq               integer     NOT NULL,
    project_id        text        NOT NULL,
    target_id         text        NOT NULL,
    provider          text        NOT NULL,
    model             text        NOT NULL,
    latency_us        bigint      NOT NULL,
    prompt_tokens     bigint      NOT NULL,
    completion_tokens bigint      NOT NULL,
    cost_micros       bigint      NOT NULL,
    status            text        NOT NULL,
    error_code        text        NOT NULL
) PARTITION BY RANGE (started_at);

CREATE INDEX model_calls_org_started_idx ON model_calls (org_id, started_at);

-- Policy findings (security events) on prompts and replies; never the matched text.
CREATE TABLE policy_findings (
    started_at timestamptz NOT NULL,
    org_id     text        NOT NULL,
    request_id text        NOT NULL,
    seq        integer     NOT NULL,
    project_id text        NOT NULL,
    direction  text        NOT NULL,
    rule       text        NOT NULL,
    category   text        NOT NULL,
    severity   text        NOT NULL,
    action     text        NOT NULL,
    score      real
) PARTITION BY RANGE (started_at);

CREATE INDEX policy_findings_org_started_idx ON policy_findings (org_id, started_at);

-- Latency histogram bucket of a latency in microseconds: 0 below 100 us, then one bucket per
-- factor 2^(1/4) up to ~839 s, 93 past it. Must equal model::hist::bucket in the service.
CREATE FUNCTION analytics_latency_bucket(latency_us bigint) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN width_bucket(latency_us, '{100,119,141,168,200,238,283,336,400,476,566,673,800,951,1131,1345,1600,1903,2263,2691,3200,3805,4525,5382,6400,7611,9051,10763,12800,15222,18102,21527,25600,30444,36204,43054,51200,60887,72408,86108,102400,121775,144815,172216,204800,243550,289631,344431,409600,487099,579262,688862,819200,974198,1158524,1377725,1638400,1948397,2317048,2755449,3276800,3896794,4634095,5510899,6553600,7793588,9268190,11021797,13107200,15587175,18536380,22043595,26214400,31174351,37072760,44087190,52428800,62348702,74145520,88174380,104857600,124697404,148291040,176348760,209715200,249394808,296582080,352697520,419430400,498789616,593164160,705395040,838860800}'::bigint[]);

-- Element-wise sum of two histograms of equal length. PL/pgSQL: an in-place loop is several
-- times cheaper per rollup upsert than an unnest/ARRAY() SQL function.
CREATE FUNCTION analytics_hist_add(a bigint[], b bigint[]) RETURNS bigint[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    FOR i IN 1 .. cardinality(a) LOOP
        a[i] := a[i] + b[i];
    END LOOP;
    RETURN a;
END $$;

-- A histogram from (bucket, count) pairs.
CREATE FUNCTION analytics_hist_from(buckets integer[], counts bigint[]) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ARRAY(
    SELECT coalesce(sum(u.n), 0)::bigint
    FROM generate_series(0, 93) AS g LEFT JOIN unnest(buckets, counts) AS u(b, n) ON u.b = g
    GROUP BY g ORDER BY g);

-- Rollups: one row per (org, bucket, project, user, model, layer), updated in the transaction
-- that stores the traces they count. latency_hist has 94 counts (see analytics_latency_bucket).
CREATE TABLE trace_rollups_hourly (
    org_id            text        NOT NULL,
    bucket_start      timestamptz NOT NULL,
    project_id        text        NOT NULL,
    user_id           text        NOT NULL,
    model             text        NOT NULL,
    layer             text        NOT NULL,
    requests          bigint      NOT NULL,
    errors            bigint      NOT NULL,
    prompt_tokens     bigint      NOT NULL,
    completion_tokens bigint      NOT NULL,
    cost_micros       bigint      NOT NULL,
    latency_sum_us    bigint      NOT NULL,
    latency_min_us    bigint      NOT NULL,
    latency_max_us    bigint      NOT NULL,
    latency_hist      bigint[]    NOT NULL,
    PRIMARY KEY (org_id, bucket_start, project_id, user_id, model, layer)
) PARTITION BY RANGE (bucket_start);

-- Per-day rollups are small and outlive raw retention (spend history), so they are not partitioned.
CREATE TABLE trace_rollups_daily (LIKE trace_rollups_hourly INCLUDING ALL);

-- Traces stored before this migration, counted into the rollups (their days get partitions of
-- every partitioned table).
DO $$
DECLARE
    day date;
    name text;
BEGIN
    FOR day IN SELECT DISTINCT (started_at AT TIME ZONE 'UTC')::date FROM request_traces LOOP
        FOREACH name IN ARRAY ARRAY['model_calls', 'policy_findings', 'trace_rollups_hourly'] LOOP
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                name || '_p' || to_char(day, 'YYYYMMDD'), name,
                day::text || ' 00:00:00+00', (day + 1)::text || ' 00:00:00+00');
        END LOOP;
    END LOOP;
END $$;

WITH cells AS (
    SELECT org_id, date_trunc('hour', started_at, 'UTC') AS bucket_start, project_id, user_id, model, layer,
           analytics_latency_bucket(latency_us) AS b, count(*) AS n, count(*) FILTER (WHERE is_error) AS errors,
           sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
           sum(cost_micros) AS cost_micros, sum(latency_us) AS latency_sum, min(latency_us) AS latency_min,
           max(latency_us) AS latency_max
    FROM request_traces
    GROUP BY 1, 2, 3, 4, 5, 6, 7
)
INSERT INTO trace_rollups_hourly
SELECT org_id, bucket_start, project_id, user_id, model, layer, sum(n), sum(errors), sum(prompt_tokens),
       sum(completion_tokens), sum(cost_micros), sum(latency_sum), min(latency_min), max(latency_max),
       analytics_hist_from(array_agg(b), array_agg(n))
FROM cells
GROUP BY 1, 2, 3, 4, 5, 6;

WITH cells AS (
    SELECT org_id, date_trunc('day', started_at, 'UTC') AS bucket_start, project_id, user_id, model, layer,
           analytics_latency_bucket(latency_us) AS b, count(*) AS n, count(*) FILTER (WHERE is_error) AS errors,
           sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
           sum(cost_micros) AS cost_micros, sum(latency_us) AS latency_sum, min(latency_us) AS latency_min,
           max(latency_us) AS latency_max
    FROM request_traces
    GROUP BY 1, 2, 3, 4, 5, 6, 7
)
INSERT INTO trace_rollups_daily
SELECT org_id, bucket_start, project_id, user_id, model, layer, sum(n), sum(errors), sum(prompt_tokens),
       sum(completion_tokens), sum(cost_micros), sum(latency_sum), min(latency_min), max(latency_max),
       analytics_hist_from(array_agg(b), array_agg(n))
FROM cells
GROUP BY 1, 2, 3, 4, 5, 6;
