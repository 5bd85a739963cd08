-- The deliveries list filtered by a time window (the console's `since` / `until`, `deliveries
-- show`) filters on `changed_at`, while history is partitioned by `finished_at` and indexed by id:
-- a window far in the past walked the id index of every newer partition to its end for no row
-- (125-128 ms with a day of 1,000,000 attempts, docs/performance.md). With this index each
-- partition finds the rows of the window directly (and an empty one at once). History is written
-- once, so this is one more index entry per finished delivery, never one per state change.
CREATE INDEX finished_delivery_by_change ON fhir_outbox.finished_delivery (project_id, changed_at);
