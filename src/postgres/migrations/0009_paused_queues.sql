-- Paused queues: a row per queue that claims must not take tasks from until
-- it is resumed (its running tasks finish). Read by every claim as a one-time
-- filter on the queue names it asks for, so a pause holds from the commit
-- that writes the row, for every worker at once, and costs a claim one probe
-- of this (nearly always empty) table.
CREATE TABLE @schema@.paused_queues (
  queue     text PRIMARY KEY,
  paused_at timestamptz NOT NULL DEFAULT now()
);
