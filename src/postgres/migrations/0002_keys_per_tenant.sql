-- Idempotency keys become unique per (queue, tenant), so one tenant's key never
-- answers with another tenant's task. '' stands for "no tenant" (a real tenant
-- is never empty), so the primary key needs no NULL handling.
ALTER TABLE @schema@.keys ADD COLUMN tenant text NOT NULL DEFAULT '';
UPDATE @schema@.keys k SET tenant = t.tenant
FROM (SELECT id, tenant FROM @schema@.tasks UNION ALL SELECT id, tenant FROM @schema@.finished) t
WHERE t.id = k.task_id AND t.tenant IS NOT NULL;
ALTER TABLE @schema@.keys DROP CONSTRAINT keys_pkey;
ALTER TABLE @schema@.keys ADD PRIMARY KEY (queue, tenant, key);
ALTER TABLE @schema@.keys ALTER COLUMN tenant DROP DEFAULT;
