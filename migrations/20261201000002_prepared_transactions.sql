-- Writes inside prepared transactions (two-phase commit).
--
-- PostgreSQL refuses PREPARE TRANSACTION for a transaction that has executed NOTIFY (SQLSTATE
-- 0A000), and the wake-up trigger of migration 7 runs at PREPARE as it runs at COMMIT: whenever a
-- dispatcher was idle, an application's PREPARE TRANSACTION after a write failed. A transaction being
-- prepared now neither notifies nor takes a waiting dispatcher's row. Its changes become visible at
-- COMMIT PREPARED, which may come from another session much later and runs no trigger; the
-- dispatcher finds them at its next wake-up (any other writer's commit) or poll (1 s by default):
-- late by at most the poll interval, never lost, because dispatch claims by query, not by message.
--
-- The trigger cannot ask PostgreSQL whether the ending command is COMMIT or PREPARE TRANSACTION, but
-- current_query() is the client's statement that is running, at both points. A statement text that
-- contains the words elsewhere (a comment, a string) only costs a missed wake-up, covered by the poll.
CREATE OR REPLACE FUNCTION fhir_outbox.wake_waiting_dispatchers() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_taken bigint;
BEGIN
    IF current_setting('fhir_outbox.wakeup_checked', true) IS DISTINCT FROM 'on' THEN
        PERFORM set_config('fhir_outbox.wakeup_checked', 'on', true);
        IF coalesce(current_query(), '') ~* '\mprepare\s+transaction\M' THEN
            RETURN NULL;
        END IF;
        IF current_setting('transaction_isolation') IN ('read committed', 'read uncommitted') THEN
            WITH taken AS (
                SELECT listener FROM fhir_outbox.dispatcher_waiting FOR UPDATE SKIP LOCKED)
            DELETE FROM fhir_outbox.dispatcher_waiting w USING taken WHERE w.listener = taken.listener;
            GET DIAGNOSTICS v_taken = ROW_COUNT;
        ELSE
            -- Locking a row that was deleted after this transaction's snapshot would fail the
            -- writer's COMMIT with a serialisation error: only look.
            SELECT count(*) INTO v_taken FROM fhir_outbox.dispatcher_waiting;
        END IF;
        IF v_taken > 0 THEN
            PERFORM pg_notify('fhir_outbox_change', '');
        END IF;
    END IF;
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION fhir_outbox.wake_waiting_dispatchers() FROM PUBLIC;
