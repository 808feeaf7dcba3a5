-- A snoozed attempt (TaskStore::snooze) is recorded but not counted: the next
-- claim starts the same attempt number again, so a task can have several
-- history rows with one number, and (task_id, attempt) no longer names a row.
-- Each row ends exactly one lease, and a lease's version is unique per task,
-- so (task_id, version) does; it is also how `settled` looks a row up. The
-- key is still led by task_id, which history, prune and remove read it by.
ALTER TABLE @schema@.attempts
  DROP CONSTRAINT attempts_pkey,
  ADD CONSTRAINT attempts_pkey PRIMARY KEY (task_id, version);
