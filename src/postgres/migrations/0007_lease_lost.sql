-- A completion sent in one pipeline with its COMMIT (complete_one) cannot let
-- the client look at its answer before the COMMIT runs: a lease found stale
-- must abort the transaction itself, or the COMMIT would keep the handler's
-- writes without the task's completion. This raises the error that does it,
-- under its own SQLSTATE, which the store turns into eoq::LeaseLost.
CREATE OR REPLACE FUNCTION @schema@.lease_lost(task_id bigint, lease_version bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'task % is no longer running under lease version %', task_id, lease_version
    USING ERRCODE = 'EQ001';
END
$$;
