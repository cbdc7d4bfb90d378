-- Tenancy: organizations own projects and users; users hold a role per project; API keys belong
-- to a project (and usually a user) and are stored as the SHA-256 of their secret only.
CREATE TABLE organizations (
    id         text        PRIMARY KEY CHECK (id <> ''),
    name       text        NOT NULL CHECK (name <> ''),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE projects (
    id         text        PRIMARY KEY CHECK (id <> ''),
    org_id     text        NOT NULL REFERENCES organizations (id),
    name       text        NOT NULL CHECK (name <> ''),
    -- Routing and security policy of the project.
    policy     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, name)
);

CREATE TABLE users (
    id         text        PRIMARY KEY CHECK (id <> ''),
    org_id     text        NOT NULL REFERENCES organizations (id),
    email      text        NOT NULL CHECK (email <> ''),
    name       text        NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (org_id, email)
);

CREATE TABLE user_roles (
    user_id    text        NOT NULL REFERENCES users (id),
    project_id text        NOT NULL REFERENCES projects (id),
    role       text        NOT NULL CHECK (role IN ('viewer', 'developer', 'admin', 'owner')),
    granted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, project_id)
);

CREATE TABLE api_keys (
    id          text        PRIMARY KEY CHECK (id <> ''),
    -- SHA-256 of the secret; the secret itself is shown once and never stored.
    secret_hash bytea       NOT NULL UNIQUE CHECK (length(secret_hash) = 32),
    -- The first characters of the secret, for people to recognise a key.
    prefix      text        NOT NULL,
    org_id      text        NOT NULL REFERENCES organizations (id),
    project_id  text        NOT NULL REFERENCES projects (id),
    user_id     text        REFERENCES users (id),
    name        text        NOT NULL DEFAULT '',
    role        text        NOT NULL CHECK (role IN ('viewer', 'developer', 'admin', 'owner')),
    -- {"endpoints": [...], "models": [...]}; an empty list allows everything.
    scopes      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    expires_at  timestamptz,
    revoked_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX api_keys_project_idx ON api_keys (project_id);

-- The tenant of the bootstrap owner key (MESHGATE_ADMIN_KEY).
INSERT INTO organizations (id, name) VALUES ('default', 'default');
INSERT INTO projects (id, org_id, name) VALUES ('default', 'default', 'default');
