-- Responses stored for `previous_response_id` and `GET /v1/responses/{id}` (the Responses API's
-- `store: true`): the conversation as the model saw it and the answer, kept per project for the
-- retention the gateway is configured with, then deleted.
CREATE TABLE stored_responses (
    project_id text        NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    id         text        NOT NULL,
    record     jsonb       NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (project_id, id)
);
CREATE INDEX stored_responses_created_at ON stored_responses (created_at);
