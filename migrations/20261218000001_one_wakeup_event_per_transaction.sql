-- The commit-time wake-up (migrations 20261122000007, 20261215000001) is a deferred constraint
-- trigger, and constraint triggers are row triggers: a transaction that inserted 1,000 outbox rows
-- (`create_resources`) queued 1,000 events and ran the SECURITY DEFINER function 1,000 times at
-- COMMIT, each call switching user and setting search_path, to act once and return 999 times.
-- Measured on the development VM: 5–10 µs per row, about a tenth of a bulk write.
--
-- A trigger's WHEN condition runs when the row is inserted, even for a deferred trigger, and an event
-- is only queued when it holds. This one holds for the first outbox row of a transaction only: it
-- marks the transaction (a transaction-local setting, as the function's own marker) the first time
-- it runs. The CASE fixes the order: look, then mark. A savepoint rolled back after the first row
-- takes both its queued event and the marker with it (settings made inside a subtransaction are
-- undone with it), so the next row queues the event again. What the function does at COMMIT is
-- unchanged; it runs once per transaction instead of once per row.
DROP TRIGGER outbox_wake_waiting_dispatchers ON fhir_outbox.outbox;
CREATE CONSTRAINT TRIGGER outbox_wake_waiting_dispatchers
    AFTER INSERT ON fhir_outbox.outbox
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (CASE WHEN pg_catalog.current_setting('fhir_outbox.wakeup_queued', true) IS DISTINCT FROM 'on'
               THEN pg_catalog.set_config('fhir_outbox.wakeup_queued', 'on', true) = 'on'
               ELSE false END)
    EXECUTE FUNCTION fhir_outbox.wake_waiting_dispatchers();
