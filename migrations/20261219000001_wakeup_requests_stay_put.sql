-- Wake-up requests (`dispatcher_waiting`, migration 20261122000007) become a flag on one row per
-- dispatch loop instead of a row inserted when the loop goes to sleep and deleted by the writer
-- that wakes it.
--
-- Every commit that writes outbox rows looks at this table. With a row inserted and deleted per
-- wake-up (about a hundred a second while 12 writers keep a dispatcher busy), the table grew by a
-- page every couple of seconds between autovacuum's visits, which come once a minute at best (and
-- whose truncation of the empty pages needs a lock that constant readers deny): measured on the
-- development VM, 9 pages for one live row after 20 s of writes, and the look took 14.7 µs of every
-- write transaction in `bench --only capture --statements`, growing with the time since the last
-- vacuum. A row that stays, whose flag is set and cleared by updates of columns no index holds,
-- gets HOT updates: new versions stay on the row's page and each visit prunes the dead ones.
-- A low fillfactor makes that pruning start as soon as the page is a tenth full (it starts when
-- the free space falls below what the fillfactor reserves), so the look reads one short page.
--
-- A loop's row is now deleted when the loop stops (or, if its process died, by the next
-- dispatcher that starts, as before); while it runs, `waiting` says whether it wants a wake-up.
ALTER TABLE fhir_outbox.dispatcher_waiting
    ADD COLUMN waiting boolean NOT NULL DEFAULT true,
    SET (fillfactor = 10);

-- The function's own once-per-transaction marker (`fhir_outbox.wakeup_checked`) also goes: since
-- migration 20261218000001 the trigger's WHEN queues this check once per transaction.
CREATE OR REPLACE FUNCTION fhir_outbox.wake_waiting_dispatchers() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_taken bigint;
BEGIN
    -- Almost always no dispatcher waits (one only waits when it has drained the outbox): a plain
    -- look first, which sees what the UPDATE's scan would see.
    IF NOT EXISTS (SELECT FROM fhir_outbox.dispatcher_waiting WHERE waiting) THEN
        RETURN NULL;
    END IF;
    IF coalesce(current_query(), '') ~* '\mprepare\s+transaction\M' THEN
        RETURN NULL;
    END IF;
    IF current_setting('transaction_isolation') IN ('read committed', 'read uncommitted') THEN
        WITH taken AS (
            SELECT listener FROM fhir_outbox.dispatcher_waiting WHERE waiting FOR UPDATE SKIP LOCKED)
        UPDATE fhir_outbox.dispatcher_waiting w SET waiting = false
        FROM taken WHERE w.listener = taken.listener;
        GET DIAGNOSTICS v_taken = ROW_COUNT;
    ELSE
        -- Locking a row that was changed after this transaction's snapshot would fail the
        -- writer's COMMIT with a serialisation error: only look.
        SELECT count(*) INTO v_taken FROM fhir_outbox.dispatcher_waiting WHERE waiting;
    END IF;
    IF v_taken > 0 THEN
        PERFORM pg_notify('fhir_outbox_change', '');
    END IF;
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION fhir_outbox.wake_waiting_dispatchers() FROM PUBLIC;
