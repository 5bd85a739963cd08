-- Since migration 20261218000001 the trigger's WHEN queues the commit-time check once per
-- transaction, so the function's own transaction-local marker (`fhir_outbox.wakeup_checked`,
-- migration 20261122000007) no longer decides anything: it was set and read once per write
-- transaction for nothing. The trigger's marker (`fhir_outbox.wakeup_queued`) is now the only one.
-- What the function does at COMMIT is otherwise unchanged.
CREATE OR REPLACE FUNCTION fhir_outbox.wake_waiting_dispatchers() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_taken bigint;
BEGIN
    -- Almost always no dispatcher waits (one only waits when it has drained the outbox): a plain
    -- look first, which sees what the DELETE's scan would see.
    IF NOT EXISTS (SELECT FROM fhir_outbox.dispatcher_waiting) THEN
        RETURN NULL;
    END IF;
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
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION fhir_outbox.wake_waiting_dispatchers() FROM PUBLIC;
