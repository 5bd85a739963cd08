-- Two costs every write paid for nothing (docs/performance.md, run X).
--
-- without_server_meta could not be inlined (its body had a FROM clause), so each call from
-- update_resource went through the SQL-function executor, which parses and plans the body again
-- for every evaluation of the calling expression: two parses and plans per update. The same
-- expression without the FROM clause is inlined where update_resource's plan is made.
CREATE OR REPLACE FUNCTION fhir_outbox.without_server_meta(r jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN coalesce(r -> 'meta', '{}'::jsonb)
                     - '{versionId,lastUpdated,project,author}'::text[] = '{}'::jsonb
                THEN r - 'meta'
                ELSE jsonb_set(r, '{meta}', coalesce(r -> 'meta', '{}'::jsonb)
                                            - '{versionId,lastUpdated,project,author}'::text[])
           END
$$;

-- The commit-time wake-up (migrations 7 and 20261201000002) ran a locking DELETE, a regular
-- expression on the statement's text and an isolation check in every write transaction, while
-- almost always no dispatcher waits (it only waits when it has drained the outbox). A plain look
-- at the table comes first now. It sees what the DELETE's scan would see (the same table, a
-- snapshot taken at the same point), so when it finds nothing the DELETE would have taken nothing,
-- and the outcome of every transaction is the one it had before.
CREATE OR REPLACE FUNCTION fhir_outbox.wake_waiting_dispatchers() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_taken bigint;
BEGIN
    IF current_setting('fhir_outbox.wakeup_checked', true) IS DISTINCT FROM 'on' THEN
        PERFORM set_config('fhir_outbox.wakeup_checked', 'on', true);
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
    END IF;
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION fhir_outbox.wake_waiting_dispatchers() FROM PUBLIC;
