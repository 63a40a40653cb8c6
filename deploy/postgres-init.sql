-- Run once by the postgres image on an empty data directory (mounted into
-- /docker-entrypoint-initdb.d by compose.yaml), as the superuser, in database "postgres".
-- Creates the `shop` database the agent replicates from and the `philotes` role it connects as.
-- wal_level=logical and the slot/sender limits come from the server command line in compose.yaml.
\set ON_ERROR_STOP on

-- The agent's password is the same POSTGRES_PASSWORD the container gets (local default
-- "philotes", see compose.yaml); \getenv (psql 15+) keeps it out of this file.
\getenv philotes_password POSTGRES_PASSWORD

-- LOGIN + REPLICATION: enough to open a `replication=database` connection and create the
-- pgoutput slot. No superuser.
CREATE ROLE philotes WITH LOGIN REPLICATION PASSWORD :'philotes_password';

-- The agent creates its publication (CREATE PUBLICATION ... FOR TABLE) when missing, which
-- needs ownership of the tables: philotes owns the database and, below, the tables.
CREATE DATABASE shop OWNER philotes;

\connect shop
SET ROLE philotes;

CREATE TABLE public.customers (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL,
    email       text NOT NULL UNIQUE,
    country     char(2) NOT NULL DEFAULT 'US',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE public.orders (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id  bigint NOT NULL REFERENCES public.customers (id),
    status       text NOT NULL DEFAULT 'new'
                 CHECK (status IN ('new', 'paid', 'shipped', 'delivered', 'cancelled')),
    amount       numeric(12, 2) NOT NULL,
    items        integer NOT NULL DEFAULT 1,
    note         text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- deploy/loadgen.sql walks orders through their statuses oldest first.
CREATE INDEX orders_status_id ON public.orders (status, id);

-- A few rows to start from. The pipeline uses snapshot = "never", so these rows are not
-- copied; only changes made after the agent created its slot reach Iceberg.
INSERT INTO public.customers (name, email, country)
SELECT 'Customer ' || g, 'customer' || g || '@example.com',
       (ARRAY['US', 'DE', 'FR', 'GR', 'JP', 'BR'])[1 + g % 6]
FROM generate_series(1, 50) AS g;

INSERT INTO public.orders (customer_id, status, amount, items)
SELECT 1 + g % 50, 'new', round((5 + random() * 495)::numeric, 2), 1 + g % 5
FROM generate_series(1, 100) AS g;

RESET ROLE;
