-- A claim rewrites its row on the same page only if the page has room for the
-- new version: the claim index then stays untouched (a HOT update). A claimed
-- row is longer than a pending one by its lease (owner, expiry, start time),
-- and at fillfactor 50 a page of small tasks could not hold every one of its
-- rows claimed: one claim in seven went to another page and inserted into
-- both indexes. At 40 a page of the smallest tasks holds all its rows claimed
-- with room for a longer host name in the owner and a retry's error.
-- Pages already written keep their layout; new rows follow the setting.
ALTER TABLE @schema@.tasks SET (fillfactor = 40);
