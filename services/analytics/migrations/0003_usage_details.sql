-- Usage details, so cost can be audited: of the prompt, the tokens read from and written to the
-- provider's prompt cache (charged at their own prices); of the completion, the reasoning tokens.
-- Per trace and summed in both rollups. Traces stored before this migration count zero of each.
ALTER TABLE request_traces
    ADD COLUMN cached_prompt_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN cache_write_tokens   bigint NOT NULL DEFAULT 0,
    ADD COLUMN reasoning_tokens     bigint NOT NULL DEFAULT 0;

ALTER TABLE trace_rollups_hourly
    ADD COLUMN cached_prompt_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN cache_write_tokens   bigint NOT NULL DEFAULT 0,
    ADD COLUMN reasoning_tokens     bigint NOT NULL DEFAULT 0;

ALTER TABLE trace_rollups_daily
    ADD COLUMN cached_prompt_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN cache_write_tokens   bigint NOT NULL DEFAULT 0,
    ADD COLUMN reasoning_tokens     bigint NOT NULL DEFAULT 0;
