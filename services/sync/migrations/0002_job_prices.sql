-- The cloud targets that may serve a job, with their prices (meshgate.sync PriceList, protobuf):
-- the delivered job's usage is charged at the price of the provider that served it. Empty for
-- jobs queued before prices were kept (charged tokens only).
ALTER TABLE sync_jobs ADD COLUMN prices bytea NOT NULL DEFAULT ''::bytea;
