-- One round of shop traffic, run in a loop by the `loadgen` service (compose profile `load`):
--   docker-compose --profile load up -d
-- psql runs in autocommit mode, so every statement below is its own transaction: many small
-- transactions per second, the way an application writes, which the agent coalesces into a
-- few Iceberg commits. About 50 changes per round (10 inserts, ~30 updates, 10 deletes).
-- Later stages run first, so an order advances one step per round and the table keeps a
-- steady size.
\set ON_ERROR_STOP on

-- Delivered and cancelled orders are purged (deletes).
DELETE FROM public.orders
WHERE id IN (SELECT id FROM public.orders WHERE status IN ('delivered', 'cancelled')
             ORDER BY id LIMIT 10);

-- Orders move along, oldest first: shipped -> delivered, paid -> shipped, new -> paid.
UPDATE public.orders SET status = 'delivered', updated_at = now()
WHERE id IN (SELECT id FROM public.orders WHERE status = 'shipped' ORDER BY id LIMIT 10);

UPDATE public.orders SET status = 'shipped', updated_at = now()
WHERE id IN (SELECT id FROM public.orders WHERE status = 'paid' ORDER BY id LIMIT 10);

UPDATE public.orders SET status = 'paid', updated_at = now()
WHERE id IN (SELECT id FROM public.orders WHERE status = 'new' ORDER BY id LIMIT 10);

-- Now and then the newest order is cancelled.
UPDATE public.orders SET status = 'cancelled', updated_at = now()
WHERE id = (SELECT id FROM public.orders WHERE status = 'new' ORDER BY id DESC LIMIT 1)
  AND random() < 0.3;

-- Now and then a new customer (about one round in five).
INSERT INTO public.customers (name, email, country)
SELECT 'Customer ' || n, 'customer' || n || '-' || floor(random() * 1e9)::bigint || '@example.com',
       (ARRAY['US', 'DE', 'FR', 'GR', 'JP', 'BR'])[1 + floor(random() * 6)::int]
FROM (SELECT floor(random() * 1e6)::bigint AS n) AS r
WHERE random() < 0.2;

-- New orders for random existing customers.
INSERT INTO public.orders (customer_id, amount, items, note)
SELECT c.id, round((5 + random() * 495)::numeric, 2), 1 + floor(random() * 5)::int,
       CASE WHEN random() < 0.1 THEN 'gift wrap' END
FROM (SELECT id FROM public.customers ORDER BY random() LIMIT 10) AS c;

-- Customers update their details once in a while.
UPDATE public.customers
SET country = (ARRAY['US', 'DE', 'FR', 'GR', 'JP', 'BR'])[1 + floor(random() * 6)::int]
WHERE id = (SELECT id FROM public.customers ORDER BY random() LIMIT 1)
  AND random() < 0.5;
