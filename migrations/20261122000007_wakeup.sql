-- Wake-ups only for dispatchers that wait for one.
--
-- Until now every write ran `pg_notify('fhir_outbox_change', '')`. A notifying transaction takes a
-- cluster-wide lock when it queues its notification at pre-commit and holds it until its commit,
-- WAL flush included, is done (PostgreSQL's PreCommit_Notify), so notifying writers commit one at a
-- time and lose group commit: that lock was most of the write throughput capture cost. A dispatcher
-- that is busy draining the outbox needs no wake-up, so writers now notify only while some dispatch
-- loop is registered here as waiting for one.
--
-- The protocol (src/dispatch/mod.rs):
--   dispatcher: finds the outbox empty → inserts its row here (commits) → dispatches once more →
--               waits for a notification or its poll interval → deletes its row if it was not
--               woken by a notification (then a writer took it) → drains.
--   writer:     at COMMIT (a deferred constraint trigger, the latest point a transaction can act),
--               takes the rows here (deletes them) and notifies if there were any.
-- A writer whose check runs before the dispatcher's row is visible has committed before the
-- dispatcher's second look (which then sees its change), or commits in the short window between its
-- own check and its commit record becoming visible. That last case is not lost: the dispatcher
-- finds the change at its next wake-up or poll, so it is late by at most the poll interval (1 s by
-- default). Under REPEATABLE READ or SERIALIZABLE the check reads the transaction's snapshot, so for
-- such writers the window is their whole transaction; also covered by the poll. Such writers only
-- look and do not take the rows (see the function): they may notify for a request already answered.

-- One row per dispatch loop that is about to sleep. UNLOGGED: these tiny writes need no WAL and no
-- flush (a transaction that wrote only unlogged tables commits without waiting for the disk), and
-- after a crash the table is empty, which is safe: a dispatcher drains the outbox when it starts.
CREATE UNLOGGED TABLE fhir_outbox.dispatcher_waiting (
    -- A dispatch loop (random, per loop and process start).
    listener    uuid PRIMARY KEY,
    -- The backend of the connection that LISTENs for that loop: when it is gone, nobody can receive
    -- the wake-up and the row is stale. A stale row costs one needless notification (the first
    -- writer to commit takes it); a dispatcher that starts removes such rows.
    backend_pid integer NOT NULL,
    since       timestamptz NOT NULL DEFAULT now()
);

-- Runs at COMMIT of every transaction that inserted outbox rows, once per row (constraint triggers
-- are row triggers), but looks at the table once per transaction: the first call sets a
-- transaction-local marker and the others return at once.
--
-- The writer that notifies also takes the requests it answers (deletes them, with its commit), and
-- writers skip requests another committing writer has locked: one waiting dispatcher costs one
-- notification, not one per writer that commits before the dispatcher has withdrawn its request.
-- (Measured: with a plain existence check, half of all write transactions notified while a dispatcher
-- kept up with 12 writers, and their commits serialised on the notification lock.) A writer that
-- skipped is not lost either: its change is visible to the woken dispatcher's drain or second look
-- unless its commit is slower than those, and then the next wake-up or poll finds it.
--
-- SECURITY DEFINER because it fires after the store function that inserted the row has returned,
-- as the writer, who may not touch this table (docs/roles.sql). A transaction that runs
-- SET CONSTRAINTS … IMMEDIATE makes the check earlier, which only widens the window above.
CREATE FUNCTION fhir_outbox.wake_waiting_dispatchers() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_taken bigint;
BEGIN
    IF current_setting('fhir_outbox.wakeup_checked', true) IS DISTINCT FROM 'on' THEN
        PERFORM set_config('fhir_outbox.wakeup_checked', 'on', true);
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

CREATE CONSTRAINT TRIGGER outbox_wake_waiting_dispatchers
    AFTER INSERT ON fhir_outbox.outbox
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION fhir_outbox.wake_waiting_dispatchers();

-- write_version as in the dispatch migration, without its unconditional pg_notify (the trigger above
-- decides now); everything else is unchanged.
CREATE OR REPLACE FUNCTION fhir_outbox.write_version(
    p_project uuid, p_type text, p_id text, p_version bigint, p_previous bigint, p_interaction text,
    p_content jsonb, p_at timestamptz, p_author text, p_request_id text, p_trace_id text)
RETURNS void LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    INSERT INTO fhir_outbox.resource_version
        (project_id, resource_type, id, version_id, deleted, content, last_updated, author)
    VALUES (p_project, p_type, p_id, p_version, p_content IS NULL, p_content, p_at, p_author);
    IF p_type = 'Subscription' THEN
        UPDATE fhir_outbox.project SET subscription_epoch = subscription_epoch + 1 WHERE id = p_project;
    END IF;
    -- AuditEvents never trigger subscriptions (delivery itself writes them, this prevents loops).
    IF p_type <> 'AuditEvent' THEN
        INSERT INTO fhir_outbox.outbox (project_id, resource_type, resource_id, version_id,
                                        previous_version_id, interaction, changed_at, request_id, trace_id)
        VALUES (p_project, p_type, p_id, p_version, p_previous, p_interaction, p_at, p_request_id, p_trace_id);
    END IF;
END
$$;
