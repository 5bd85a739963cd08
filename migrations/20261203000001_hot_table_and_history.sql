-- Storage for years of traffic (issue 17): a hot table that holds unfinished work only, and an
-- append-only history partitioned by day for everything finished.
--
--   unfinished_delivery  pending and in-flight deliveries: what claims scan. A delivery leaves it
--                        when it finishes, in the recorder's transaction, so its size is the
--                        backlog, whatever the history.
--   finished_delivery    succeeded, skipped, failed and cancelled deliveries, partitioned by
--                        `finished_at`; written once.
--   delivery_attempt     the attempt log, partitioned by `started_at`; written once.
--   audit_event          the AuditEvents of delivery attempts and operator actions, partitioned
--                        by `recorded_at`: one row each (no `resource`/`resource_version` pair),
--                        readable through read_resource, vread_resource and resource_history.
--   delivery (view)      both delivery tables, with the columns the table had: what operators,
--                        views and the console read. It can be updated as the table could; a
--                        state change moves the row to the table its state belongs to.
--
-- Retention drops whole days (`drop_history_partitions`) instead of deleting rows;
-- `ensure_history_partitions` creates the days ahead (every worker runs it). Rows older than this
-- migration are in each table's `_before` partition.

DROP VIEW fhir_outbox.subscription_delivery_status;
DROP VIEW fhir_outbox.delivery_attempt_log;
DROP VIEW fhir_outbox.endpoint_health;

-- One sequence for delivery ids, whichever table the row is in.
ALTER TABLE fhir_outbox.delivery RENAME TO delivery_before_history;
ALTER TABLE fhir_outbox.delivery_before_history ALTER COLUMN id DROP IDENTITY;
-- Its indexes' names go to the new tables (and the copy below needs none of them).
DROP INDEX fhir_outbox.delivery_by_resource, fhir_outbox.delivery_by_subscription,
    fhir_outbox.delivery_due, fhir_outbox.delivery_finished, fhir_outbox.delivery_given_up,
    fhir_outbox.delivery_leased, fhir_outbox.delivery_queue;
CREATE SEQUENCE fhir_outbox.delivery_id_seq;
SELECT setval('fhir_outbox.delivery_id_seq',
              (SELECT coalesce(max(id), 0) + 1 FROM fhir_outbox.delivery_before_history), false);

-- The hot table, in two lanes. Its indexes are the claim's (delivery_queue, delivery_due,
-- delivery_leased) and the primary key: every index here is written by the dispatcher's insert and
-- again by the claim's update (a state change is never a HOT update), so none serves history.
--
-- Why lanes: every delivery leaves dead row versions here (the claim's update, the completion's
-- delete). VACUUM removes them, unless a transaction somewhere holds the xmin horizon (a long
-- report, a forgotten BEGIN, a replica's feedback): then they pile up, and every claim walks them
-- in the claim's indexes. So writes go to the current lane (inserts, and the claim, a retry or a
-- release move their row there), the other lane drains, and once it is empty it is truncated,
-- which removes its dead versions whatever the horizon (`rotate_delivery_lanes`, run by every
-- worker). Lanes switch only when the current one has more dead versions than VACUUM keeps up
-- with.
CREATE TABLE fhir_outbox.delivery_lane (
    only_row    boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    current     smallint NOT NULL DEFAULT 0 CHECK (current IN (0, 1)),
    switched_at timestamptz NOT NULL DEFAULT now(),
    switches    bigint NOT NULL DEFAULT 0
);
INSERT INTO fhir_outbox.delivery_lane DEFAULT VALUES;

-- The lane writes go to.
CREATE FUNCTION fhir_outbox.current_delivery_lane() RETURNS smallint
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT current FROM fhir_outbox.delivery_lane
$$;

CREATE TABLE fhir_outbox.unfinished_delivery (
    id                  bigint NOT NULL DEFAULT nextval('fhir_outbox.delivery_id_seq'),
    webhook_id          uuid NOT NULL DEFAULT gen_random_uuid(),
    project_id          uuid NOT NULL,
    subscription_id     text NOT NULL,
    outbox_seq          bigint NOT NULL,
    resource_project_id uuid NOT NULL,
    resource_type       text NOT NULL,
    resource_id         text NOT NULL,
    version_id          bigint NOT NULL,
    previous_version_id bigint,
    interaction         text NOT NULL CHECK (interaction IN ('create', 'update', 'delete')),
    changed_at          timestamptz NOT NULL,
    request_id          text NOT NULL,
    trace_id            text NOT NULL,
    matched_at          timestamptz NOT NULL,
    state               text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'in_flight')),
    attempts            integer NOT NULL DEFAULT 0,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    reason              text,
    lease_token         uuid,
    lease_expires_at    timestamptz,
    claims              integer NOT NULL DEFAULT 0,
    preamble_failures   integer NOT NULL DEFAULT 0,
    last_status         integer,
    replay              boolean NOT NULL DEFAULT false,
    lane                smallint NOT NULL DEFAULT fhir_outbox.current_delivery_lane(),
    PRIMARY KEY (id, lane)
) PARTITION BY LIST (lane);
CREATE TABLE fhir_outbox.unfinished_delivery_lane0 PARTITION OF fhir_outbox.unfinished_delivery
    FOR VALUES IN (0) WITH (fillfactor = 80);
CREATE TABLE fhir_outbox.unfinished_delivery_lane1 PARTITION OF fhir_outbox.unfinished_delivery
    FOR VALUES IN (1) WITH (fillfactor = 80);
ALTER SEQUENCE fhir_outbox.delivery_id_seq OWNED BY fhir_outbox.unfinished_delivery.id;

-- History: what a delivery ended as. No lease (it has none), a `finished_at` always.
CREATE TABLE fhir_outbox.finished_delivery (
    id                  bigint NOT NULL DEFAULT nextval('fhir_outbox.delivery_id_seq'),
    webhook_id          uuid NOT NULL DEFAULT gen_random_uuid(),
    project_id          uuid NOT NULL,
    subscription_id     text NOT NULL,
    outbox_seq          bigint NOT NULL,
    resource_project_id uuid NOT NULL,
    resource_type       text NOT NULL,
    resource_id         text NOT NULL,
    version_id          bigint NOT NULL,
    previous_version_id bigint,
    interaction         text NOT NULL CHECK (interaction IN ('create', 'update', 'delete')),
    changed_at          timestamptz NOT NULL,
    request_id          text NOT NULL,
    trace_id            text NOT NULL,
    matched_at          timestamptz NOT NULL,
    state               text NOT NULL CHECK (state IN ('succeeded', 'skipped', 'failed', 'cancelled')),
    attempts            integer NOT NULL DEFAULT 0,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz NOT NULL DEFAULT now(),
    reason              text,
    claims              integer NOT NULL DEFAULT 0,
    preamble_failures   integer NOT NULL DEFAULT 0,
    last_status         integer,
    replay              boolean NOT NULL DEFAULT false
) PARTITION BY RANGE (finished_at);

ALTER TABLE fhir_outbox.delivery_attempt RENAME TO delivery_attempt_before_history;
ALTER TABLE fhir_outbox.delivery_attempt_before_history ALTER COLUMN id DROP IDENTITY;
DROP INDEX fhir_outbox.delivery_attempt_by_delivery, fhir_outbox.delivery_attempt_by_subscription,
    fhir_outbox.delivery_attempt_recent;
CREATE SEQUENCE fhir_outbox.delivery_attempt_id_seq;
SELECT setval('fhir_outbox.delivery_attempt_id_seq',
              (SELECT coalesce(max(id), 0) + 1 FROM fhir_outbox.delivery_attempt_before_history), false);

CREATE TABLE fhir_outbox.delivery_attempt (
    id              bigint NOT NULL DEFAULT nextval('fhir_outbox.delivery_attempt_id_seq'),
    delivery_id     bigint NOT NULL,
    project_id      uuid NOT NULL,
    subscription_id text NOT NULL,
    attempt         integer NOT NULL,
    started_at      timestamptz NOT NULL,
    duration_ms     integer NOT NULL,
    succeeded       boolean NOT NULL,
    status          integer,
    error           text,
    response_body   text,
    audit_event_id  text
) PARTITION BY RANGE (started_at);
ALTER SEQUENCE fhir_outbox.delivery_attempt_id_seq OWNED BY fhir_outbox.delivery_attempt.id;

-- An AuditEvent of the pipeline, stored once, stamped (`meta`) as the store stamps resources.
-- Its id is a UUIDv7, whose first 48 bits are `recorded_at` in milliseconds, so a read by id
-- visits one day's partition.
CREATE TABLE fhir_outbox.audit_event (
    project_id  uuid NOT NULL,
    id          text NOT NULL,
    recorded_at timestamptz NOT NULL,
    content     jsonb NOT NULL
) PARTITION BY RANGE (recorded_at);

-- Rows older than this migration, whatever their age: dropped as a whole once all of the
-- partition is past retention.
CREATE TABLE fhir_outbox.finished_delivery_before PARTITION OF fhir_outbox.finished_delivery
    FOR VALUES FROM (MINVALUE) TO (date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC');
CREATE TABLE fhir_outbox.delivery_attempt_before PARTITION OF fhir_outbox.delivery_attempt
    FOR VALUES FROM (MINVALUE) TO (date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC');
CREATE TABLE fhir_outbox.audit_event_before PARTITION OF fhir_outbox.audit_event
    FOR VALUES FROM (MINVALUE) TO (date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC');

-- History indexes, one per question asked of it (each partition has its own copy):
-- a delivery by id (the console, operator actions), a subscription's or a resource's deliveries
-- newest first, the given-up ones of a project.
CREATE INDEX finished_delivery_by_id ON fhir_outbox.finished_delivery (id);
CREATE INDEX finished_delivery_by_subscription
    ON fhir_outbox.finished_delivery (project_id, subscription_id, id);
CREATE INDEX finished_delivery_by_resource
    ON fhir_outbox.finished_delivery (project_id, resource_type, resource_id, id);
CREATE INDEX finished_delivery_given_up ON fhir_outbox.finished_delivery (project_id, id)
    WHERE state IN ('failed', 'skipped', 'cancelled');
CREATE INDEX delivery_attempt_by_delivery ON fhir_outbox.delivery_attempt (delivery_id);
CREATE INDEX delivery_attempt_by_subscription
    ON fhir_outbox.delivery_attempt (project_id, subscription_id, started_at)
    INCLUDE (succeeded, duration_ms);
CREATE INDEX delivery_attempt_recent ON fhir_outbox.delivery_attempt (started_at)
    INCLUDE (project_id, succeeded, duration_ms);
CREATE INDEX audit_event_by_id ON fhir_outbox.audit_event (id);

-- Creates the daily partitions of the three history tables from today (UTC) to `p_days_ahead`
-- days ahead, those missing. Each is created apart and attached, so that writers are not blocked
-- (ATTACH takes a lock that lets inserts and reads go on). Returns the partitions created.
CREATE FUNCTION fhir_outbox.ensure_history_partitions(p_days_ahead integer DEFAULT 7)
RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_table text;
    v_day date;
    v_name text;
    v_today date := (now() AT TIME ZONE 'UTC')::date;
BEGIN
    IF p_days_ahead IS NULL OR p_days_ahead < 1 OR p_days_ahead > 366 THEN
        RAISE EXCEPTION 'days ahead must be between 1 and 366, not %', p_days_ahead USING ERRCODE = 'OB001';
    END IF;
    -- One maintainer at a time; the others find the work done.
    PERFORM pg_advisory_xact_lock(hashtext('fhir_outbox.history_partitions'));
    FOREACH v_table IN ARRAY ARRAY['finished_delivery', 'delivery_attempt', 'audit_event'] LOOP
        FOR v_day IN SELECT d::date FROM generate_series(v_today, v_today + p_days_ahead, interval '1 day') d LOOP
            v_name := v_table || '_' || to_char(v_day, 'YYYYMMDD');
            CONTINUE WHEN to_regclass('fhir_outbox.' || v_name) IS NOT NULL;
            -- A range another partition already covers (the `_before` one, on the migration's day).
            CONTINUE WHEN EXISTS (
                SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                WHERE i.inhparent = ('fhir_outbox.' || v_table)::regclass
                  AND pg_get_expr(c.relpartbound, c.oid) LIKE '%MINVALUE%'
                  AND (substring(pg_get_expr(c.relpartbound, c.oid) FROM 'TO \(''([^'']+)''\)'))::timestamptz
                      > (v_day::timestamp AT TIME ZONE 'UTC'));
            EXECUTE format('CREATE TABLE fhir_outbox.%I (LIKE fhir_outbox.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                           v_name, v_table);
            EXECUTE format('ALTER TABLE fhir_outbox.%I ATTACH PARTITION fhir_outbox.%I FOR VALUES FROM (%L) TO (%L)',
                           v_table, v_name,
                           v_day::timestamp AT TIME ZONE 'UTC', (v_day + 1)::timestamp AT TIME ZONE 'UTC');
            RETURN NEXT v_name;
        END LOOP;
    END LOOP;
END
$$;

-- Drops the partitions of `p_table` (one of the three history tables) that lie wholly before
-- `p_before`, and returns each with the rows it held: counted when the partition was never
-- analysed, else as its statistics say (a day-old partition has been; counting a day of history
-- would read all of it, and take longer than the drop). The lock a drop needs is waited for one
-- second at most: a long reader of the table makes this pass skip the partition (the next pass
-- drops it), instead of queueing every writer behind the drop.
CREATE FUNCTION fhir_outbox.drop_history_partitions(p_table text, p_before timestamptz)
RETURNS TABLE (partition text, rows bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_partition record;
BEGIN
    IF p_table IS NULL OR p_table NOT IN ('finished_delivery', 'delivery_attempt', 'audit_event') THEN
        RAISE EXCEPTION '"%" is not a history table', p_table USING ERRCODE = 'OB001';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('fhir_outbox.history_partitions'));
    FOR v_partition IN
        SELECT c.relname,
               (substring(pg_get_expr(c.relpartbound, c.oid) FROM 'TO \(''([^'']+)''\)'))::timestamptz AS upper_bound
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = ('fhir_outbox.' || p_table)::regclass
        ORDER BY 2
    LOOP
        CONTINUE WHEN v_partition.upper_bound IS NULL OR v_partition.upper_bound > p_before;
        BEGIN
            SET LOCAL lock_timeout = '1s';
            SELECT CASE WHEN c.reltuples >= 0 THEN c.reltuples::bigint END INTO rows
            FROM pg_class c WHERE c.oid = ('fhir_outbox.' || v_partition.relname)::regclass;
            IF rows IS NULL THEN
                EXECUTE format('SELECT count(*) FROM fhir_outbox.%I', v_partition.relname) INTO rows;
            END IF;
            EXECUTE format('DROP TABLE fhir_outbox.%I', v_partition.relname);
            partition := v_partition.relname;
            RETURN NEXT;
        EXCEPTION WHEN lock_not_available THEN
            RAISE WARNING 'retention skipped partition % this pass: it is in use', v_partition.relname;
        END;
    END LOOP;
END
$$;

-- Keeps the hot table's dead row versions bounded whatever the xmin horizon (see `delivery_lane`):
-- 1. when at most `p_max_moves` pending deliveries are left in the other lane, moves them to the
--    current one (the others leave it as they are claimed, which moves them; in-flight ones finish
--    where they are): the stragglers (a paused subscription's, retries due later) are moved, a
--    backlog never is, so that a pass stays cheap whatever the backlog;
-- 2. once the other lane holds no delivery, truncates it if it has pages (under an exclusive lock
--    on that lane alone, waited for 200 ms at most, so that no write can land in it meanwhile);
-- 3. then switches lanes if the current one has at least `p_min_dead` dead versions and more dead
--    than live ones (VACUUM is not keeping up, or cannot), and became current `p_min_seconds` ago.
-- One worker at a time; the others return at once.
CREATE FUNCTION fhir_outbox.rotate_delivery_lanes(p_min_seconds float8 DEFAULT 10,
                                                  p_min_dead bigint DEFAULT 10000,
                                                  p_max_moves integer DEFAULT 10000,
                                                  OUT moved bigint, OUT truncated boolean,
                                                  OUT switched boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_current smallint;
    v_switched_at timestamptz;
    v_other smallint;
    v_other_table text;
    v_dead bigint;
    v_live bigint;
BEGIN
    moved := 0;
    truncated := false;
    switched := false;
    IF NOT pg_try_advisory_xact_lock(hashtext('fhir_outbox.delivery_lanes')) THEN
        RETURN;
    END IF;
    SELECT current, switched_at INTO v_current, v_switched_at FROM fhir_outbox.delivery_lane;
    v_other := 1 - v_current;
    v_other_table := 'unfinished_delivery_lane' || v_other;
    IF (SELECT count(*) FROM (SELECT 1 FROM fhir_outbox.unfinished_delivery
                              WHERE lane = v_other AND state = 'pending'
                              LIMIT p_max_moves + 1) p) > p_max_moves THEN
        RETURN;
    END IF;
    WITH movable AS (
        SELECT id FROM fhir_outbox.unfinished_delivery
        WHERE lane = v_other AND state = 'pending'
        FOR UPDATE SKIP LOCKED),
    m AS (
        UPDATE fhir_outbox.unfinished_delivery d SET lane = v_current
        FROM movable WHERE d.id = movable.id AND d.lane = v_other
        RETURNING 1)
    SELECT count(*) INTO moved FROM m;
    IF moved > 0 THEN
        RETURN;
    END IF;
    IF pg_relation_size(('fhir_outbox.' || v_other_table)::regclass) > 0 THEN
        BEGIN
            PERFORM set_config('lock_timeout', '200ms', true);
            EXECUTE format('LOCK TABLE fhir_outbox.%I IN ACCESS EXCLUSIVE MODE', v_other_table);
            IF EXISTS (SELECT 1 FROM fhir_outbox.unfinished_delivery WHERE lane = v_other) THEN
                RETURN;
            END IF;
            EXECUTE format('TRUNCATE fhir_outbox.%I', v_other_table);
            truncated := true;
        EXCEPTION WHEN lock_not_available THEN
            RETURN;
        END;
    END IF;
    SELECT n_dead_tup, n_live_tup INTO v_dead, v_live FROM pg_stat_user_tables
    WHERE relid = ('fhir_outbox.unfinished_delivery_lane' || v_current)::regclass;
    IF v_dead >= p_min_dead AND v_dead > v_live
       AND now() - v_switched_at >= make_interval(secs => p_min_seconds) THEN
        UPDATE fhir_outbox.delivery_lane
        SET current = v_other, switched_at = now(), switches = switches + 1;
        switched := true;
    END IF;
END
$$;

-- Today and the week ahead, before any row moves in.
SELECT count(*) FROM fhir_outbox.ensure_history_partitions(7);

-- Moving the data: unfinished deliveries to the hot table, finished ones to history.
INSERT INTO fhir_outbox.unfinished_delivery
    (id, webhook_id, project_id, subscription_id, outbox_seq, resource_project_id, resource_type,
     resource_id, version_id, previous_version_id, interaction, changed_at, request_id, trace_id,
     matched_at, state, attempts, next_attempt_at, reason, lease_token, lease_expires_at, claims,
     preamble_failures, last_status, replay)
SELECT id, webhook_id, project_id, subscription_id, outbox_seq, resource_project_id, resource_type,
       resource_id, version_id, previous_version_id, interaction, changed_at, request_id, trace_id,
       matched_at, state, attempts, next_attempt_at, reason, lease_token, lease_expires_at, claims,
       preamble_failures, last_status, replay
FROM fhir_outbox.delivery_before_history WHERE state IN ('pending', 'in_flight');

INSERT INTO fhir_outbox.finished_delivery
    (id, webhook_id, project_id, subscription_id, outbox_seq, resource_project_id, resource_type,
     resource_id, version_id, previous_version_id, interaction, changed_at, request_id, trace_id,
     matched_at, state, attempts, next_attempt_at, finished_at, reason, claims, preamble_failures,
     last_status, replay)
SELECT id, webhook_id, project_id, subscription_id, outbox_seq, resource_project_id, resource_type,
       resource_id, version_id, previous_version_id, interaction, changed_at, request_id, trace_id,
       matched_at, state, attempts, next_attempt_at, coalesce(finished_at, matched_at), reason, claims,
       preamble_failures, last_status, replay
FROM fhir_outbox.delivery_before_history WHERE state NOT IN ('pending', 'in_flight');

INSERT INTO fhir_outbox.delivery_attempt
    (id, delivery_id, project_id, subscription_id, attempt, started_at, duration_ms, succeeded,
     status, error, response_body, audit_event_id)
SELECT id, delivery_id, project_id, subscription_id, attempt, started_at, duration_ms, succeeded,
       status, error, response_body, audit_event_id
FROM fhir_outbox.delivery_attempt_before_history;

DROP TABLE fhir_outbox.delivery_before_history;
DROP TABLE fhir_outbox.delivery_attempt_before_history;

-- The AuditEvents written by create_audit_events (one version each, never changed) move to
-- audit_event; an AuditEvent an application wrote through create_resource and then changed stays
-- a versioned resource.
WITH single AS (
    SELECT r.project_id, r.id
    FROM fhir_outbox.resource r
    WHERE r.resource_type = 'AuditEvent' AND r.version_id = 1 AND NOT r.deleted),
moved AS (
    INSERT INTO fhir_outbox.audit_event (project_id, id, recorded_at, content)
    SELECT v.project_id, v.id, v.last_updated, v.content
    FROM single s JOIN fhir_outbox.resource_version v
      ON v.project_id = s.project_id AND v.resource_type = 'AuditEvent' AND v.id = s.id AND v.version_id = 1
    RETURNING project_id, id),
versions AS (
    DELETE FROM fhir_outbox.resource_version v USING moved m
    WHERE v.project_id = m.project_id AND v.resource_type = 'AuditEvent' AND v.id = m.id)
DELETE FROM fhir_outbox.resource r USING moved m
WHERE r.project_id = m.project_id AND r.resource_type = 'AuditEvent' AND r.id = m.id;

CREATE INDEX delivery_queue ON fhir_outbox.unfinished_delivery
    (project_id, subscription_id, next_attempt_at, id) WHERE state = 'pending';
CREATE INDEX delivery_due ON fhir_outbox.unfinished_delivery (next_attempt_at) WHERE state = 'pending';
CREATE INDEX delivery_leased ON fhir_outbox.unfinished_delivery (lease_expires_at) WHERE state = 'in_flight';

-- Every delivery, wherever it is, with the columns of the former table.
CREATE VIEW fhir_outbox.delivery AS
SELECT id, webhook_id, project_id, subscription_id, outbox_seq, resource_project_id, resource_type,
       resource_id, version_id, previous_version_id, interaction, changed_at, request_id, trace_id,
       matched_at, state, attempts, next_attempt_at, NULL::timestamptz AS finished_at, reason,
       lease_token, lease_expires_at, claims, preamble_failures, last_status, replay
FROM fhir_outbox.unfinished_delivery
UNION ALL
SELECT id, webhook_id, project_id, subscription_id, outbox_seq, resource_project_id, resource_type,
       resource_id, version_id, previous_version_id, interaction, changed_at, request_id, trace_id,
       matched_at, state, attempts, next_attempt_at, finished_at, reason,
       NULL::uuid, NULL::timestamptz, claims, preamble_failures, last_status, replay
FROM fhir_outbox.finished_delivery;

-- Writes through the view, as the table took them (operators' SQL, operator actions): the row
-- lands in, or moves to, the table of its new state. The pipeline's own hot path writes the
-- tables directly, set-based.
CREATE FUNCTION fhir_outbox.write_delivery_view() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_unfinished boolean;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        IF OLD.state IN ('pending', 'in_flight') THEN
            DELETE FROM fhir_outbox.unfinished_delivery WHERE id = OLD.id;
        ELSE
            DELETE FROM fhir_outbox.finished_delivery WHERE id = OLD.id AND finished_at = OLD.finished_at;
        END IF;
        IF TG_OP = 'DELETE' THEN
            RETURN OLD;
        END IF;
    END IF;
    NEW.id := coalesce(NEW.id, nextval('fhir_outbox.delivery_id_seq'));
    NEW.webhook_id := coalesce(NEW.webhook_id, gen_random_uuid());
    NEW.state := coalesce(NEW.state, 'pending');
    NEW.attempts := coalesce(NEW.attempts, 0);
    NEW.claims := coalesce(NEW.claims, 0);
    NEW.preamble_failures := coalesce(NEW.preamble_failures, 0);
    NEW.replay := coalesce(NEW.replay, false);
    NEW.next_attempt_at := coalesce(NEW.next_attempt_at, now());
    v_unfinished := NEW.state IN ('pending', 'in_flight');
    IF v_unfinished THEN
        NEW.finished_at := NULL;
        INSERT INTO fhir_outbox.unfinished_delivery
            (id, webhook_id, project_id, subscription_id, outbox_seq, resource_project_id,
             resource_type, resource_id, version_id, previous_version_id, interaction, changed_at,
             request_id, trace_id, matched_at, state, attempts, next_attempt_at, reason, lease_token,
             lease_expires_at, claims, preamble_failures, last_status, replay)
        VALUES (NEW.id, NEW.webhook_id, NEW.project_id, NEW.subscription_id, NEW.outbox_seq,
                NEW.resource_project_id, NEW.resource_type, NEW.resource_id, NEW.version_id,
                NEW.previous_version_id, NEW.interaction, NEW.changed_at, NEW.request_id,
                NEW.trace_id, NEW.matched_at, NEW.state, NEW.attempts, NEW.next_attempt_at,
                NEW.reason, NEW.lease_token, NEW.lease_expires_at, NEW.claims,
                NEW.preamble_failures, NEW.last_status, NEW.replay);
    ELSE
        NEW.finished_at := coalesce(NEW.finished_at, now());
        NEW.lease_token := NULL;
        NEW.lease_expires_at := NULL;
        INSERT INTO fhir_outbox.finished_delivery
            (id, webhook_id, project_id, subscription_id, outbox_seq, resource_project_id,
             resource_type, resource_id, version_id, previous_version_id, interaction, changed_at,
             request_id, trace_id, matched_at, state, attempts, next_attempt_at, finished_at, reason,
             claims, preamble_failures, last_status, replay)
        VALUES (NEW.id, NEW.webhook_id, NEW.project_id, NEW.subscription_id, NEW.outbox_seq,
                NEW.resource_project_id, NEW.resource_type, NEW.resource_id, NEW.version_id,
                NEW.previous_version_id, NEW.interaction, NEW.changed_at, NEW.request_id,
                NEW.trace_id, NEW.matched_at, NEW.state, NEW.attempts, NEW.next_attempt_at,
                NEW.finished_at, NEW.reason, NEW.claims, NEW.preamble_failures, NEW.last_status,
                NEW.replay);
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER delivery_view_writes INSTEAD OF INSERT OR UPDATE OR DELETE ON fhir_outbox.delivery
    FOR EACH ROW EXECUTE FUNCTION fhir_outbox.write_delivery_view();

-- AuditEvents: written once, in audit_event, with a UUIDv7 id.
CREATE FUNCTION fhir_outbox.uuid_v7(p_at timestamptz) RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    -- A random (v4) UUID whose first 48 bits become the time in milliseconds and whose version
    -- nibble becomes 7 (bits 52 and 53 set on top of v4's 0100).
    SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
                                          PLACING substring(int8send(floor(extract(epoch FROM p_at) * 1000)::bigint) FROM 3)
                                          FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid
$$;

-- The time a UUIDv7 was made at (to the millisecond), or NULL for any other text.
CREATE FUNCTION fhir_outbox.uuid_v7_time(p_id text) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN p_id ~* '^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$'
                THEN to_timestamp(('x' || lpad(left(replace(p_id, '-', ''), 12), 16, '0'))::bit(64)::bigint / 1000.0)
           END
$$;

CREATE OR REPLACE FUNCTION fhir_outbox.create_audit_events(p_projects uuid[], p_events jsonb[])
RETURNS TABLE (ordinal bigint, audit_event_id text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_at timestamptz := clock_timestamp();
BEGIN
    IF cardinality(p_projects) IS DISTINCT FROM cardinality(p_events) THEN
        RAISE EXCEPTION 'create_audit_events needs one project per event (% projects, % events)',
            cardinality(p_projects), cardinality(p_events) USING ERRCODE = 'OB001';
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(p_events) AS e(event)
               WHERE event IS NULL OR jsonb_typeof(event) <> 'object'
                  OR event ->> 'resourceType' IS DISTINCT FROM 'AuditEvent') THEN
        RAISE EXCEPTION 'create_audit_events writes AuditEvent objects only' USING ERRCODE = 'OB001';
    END IF;
    RETURN QUERY
    WITH input AS MATERIALIZED (
        SELECT e.n, e.project_id, fhir_outbox.uuid_v7(v_at)::text AS new_id,
               CASE WHEN e.event::text ~ '""|\{\}|\[\]'
                    THEN fhir_outbox.strip_empty(jsonb_strip_nulls(e.event))
                    ELSE jsonb_strip_nulls(e.event) END AS content
        FROM unnest(p_projects, p_events) WITH ORDINALITY AS e(project_id, event, n)),
    stored AS (
        INSERT INTO fhir_outbox.audit_event (project_id, id, recorded_at, content)
        SELECT i.project_id, i.new_id, v_at,
               fhir_outbox.stamped(i.content, i.project_id, i.new_id, 1, v_at, NULL)
        FROM input i)
    SELECT i.n, i.new_id FROM input i ORDER BY i.n;
END
$$;

-- One stored AuditEvent of the pipeline by id, or nothing: its day's partition only when the id
-- carries its time (ids from before this migration are looked up in every partition).
CREATE FUNCTION fhir_outbox.stored_audit_event(p_project uuid, p_id text) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT a.content FROM fhir_outbox.audit_event a
    WHERE a.project_id = p_project AND a.id = p_id
      AND (fhir_outbox.uuid_v7_time(p_id) IS NULL
           OR a.recorded_at BETWEEN fhir_outbox.uuid_v7_time(p_id)
                                AND fhir_outbox.uuid_v7_time(p_id) + interval '1 millisecond')
$$;

CREATE OR REPLACE FUNCTION fhir_outbox.read_resource(p_project uuid, p_resource_type text, p_id text)
RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_current record;
    v_audit jsonb;
BEGIN
    SELECT r.deleted, v.content INTO v_current
    FROM fhir_outbox.resource r
    JOIN fhir_outbox.resource_version v USING (project_id, resource_type, id, version_id)
    WHERE r.project_id = p_project AND r.resource_type = p_resource_type AND r.id = p_id;
    IF NOT FOUND THEN
        IF p_resource_type = 'AuditEvent' THEN
            v_audit := fhir_outbox.stored_audit_event(p_project, p_id);
            IF v_audit IS NOT NULL THEN
                RETURN v_audit;
            END IF;
        END IF;
        RAISE EXCEPTION '%/% not found', left(p_resource_type, 100), left(p_id, 100) USING ERRCODE = 'OB008';
    END IF;
    IF v_current.deleted THEN
        RAISE EXCEPTION '%/% is deleted', p_resource_type, p_id USING ERRCODE = 'OB009';
    END IF;
    RETURN v_current.content;
END
$$;

CREATE OR REPLACE FUNCTION fhir_outbox.vread_resource(p_project uuid, p_resource_type text, p_id text,
                                                      p_version_id bigint)
RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_version record;
    v_audit jsonb;
BEGIN
    SELECT v.deleted, v.content INTO v_version
    FROM fhir_outbox.resource_version v
    WHERE v.project_id = p_project AND v.resource_type = p_resource_type AND v.id = p_id
      AND v.version_id = p_version_id;
    IF NOT FOUND THEN
        IF p_resource_type = 'AuditEvent' AND p_version_id = 1 THEN
            v_audit := fhir_outbox.stored_audit_event(p_project, p_id);
            IF v_audit IS NOT NULL THEN
                RETURN v_audit;
            END IF;
        END IF;
        RAISE EXCEPTION '%/%/_history/% not found', left(p_resource_type, 100), left(p_id, 100), p_version_id
            USING ERRCODE = 'OB008';
    END IF;
    IF v_version.deleted THEN
        RAISE EXCEPTION '%/%/_history/% is a deletion', p_resource_type, p_id, p_version_id
            USING ERRCODE = 'OB009';
    END IF;
    RETURN v_version.content;
END
$$;

CREATE OR REPLACE FUNCTION fhir_outbox.resource_history(p_project uuid, p_resource_type text, p_id text)
RETURNS TABLE (version_id bigint, deleted boolean, last_updated timestamptz, author text, resource jsonb)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT v.version_id, v.deleted, v.last_updated, v.author, v.content
    FROM fhir_outbox.resource_version v
    WHERE v.project_id = p_project AND v.resource_type = p_resource_type AND v.id = p_id
    UNION ALL
    SELECT 1, false, (a.content #>> '{meta,lastUpdated}')::timestamptz, NULL, a.content
    FROM (SELECT fhir_outbox.stored_audit_event(p_project, p_id) AS content) a
    WHERE p_resource_type = 'AuditEvent' AND a.content IS NOT NULL
    ORDER BY 1 DESC
$$;

-- The views, as before, over the new tables.
CREATE VIEW fhir_outbox.subscription_delivery_status AS
SELECT r.project_id,
       r.id                                           AS subscription_id,
       v.content ->> 'status'                         AS status,
       v.content -> 'channel' ->> 'type'              AS channel_type,
       v.content ->> 'criteria'                       AS criteria,
       (p.subscription_id IS NOT NULL)                AS paused,
       coalesce(u.pending, 0)                         AS pending,
       coalesce(u.in_flight, 0)                       AS in_flight,
       coalesce(f.succeeded, 0)                       AS succeeded,
       coalesce(f.skipped, 0)                         AS skipped,
       coalesce(f.failed, 0)                          AS failed,
       u.oldest_undelivered_at,
       now() - u.oldest_undelivered_at                AS oldest_undelivered_age,
       coalesce(u.last_error, f.last_error)           AS last_error,
       f.last_skip_reason,
       f.last_finished_at,
       coalesce(i.issues, 0)                          AS issues,
       i.suspended_reason,
       coalesce(f.cancelled, 0)                       AS cancelled
FROM fhir_outbox.resource r
JOIN fhir_outbox.resource_version v USING (project_id, resource_type, id, version_id)
LEFT JOIN fhir_outbox.subscription_pause p ON p.project_id = r.project_id AND p.subscription_id = r.id
-- Unfinished work from the hot table's partial indexes (pending by delivery_queue, in flight by
-- delivery_leased), finished work from history.
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE x.state = 'pending')   AS pending,
           count(*) FILTER (WHERE x.state = 'in_flight') AS in_flight,
           min(x.changed_at) AS oldest_undelivered_at,
           (array_agg(x.reason ORDER BY x.id DESC) FILTER (WHERE x.reason IS NOT NULL))[1] AS last_error
    FROM (SELECT id, state, changed_at, reason FROM fhir_outbox.unfinished_delivery
          WHERE state = 'pending' AND project_id = r.project_id AND subscription_id = r.id
          UNION ALL
          SELECT id, state, changed_at, NULL FROM fhir_outbox.unfinished_delivery
          WHERE state = 'in_flight' AND project_id = r.project_id AND subscription_id = r.id) x
) u ON true
LEFT JOIN LATERAL (
    SELECT count(*) FILTER (WHERE x.state = 'succeeded') AS succeeded,
           count(*) FILTER (WHERE x.state = 'skipped')   AS skipped,
           count(*) FILTER (WHERE x.state = 'failed')    AS failed,
           count(*) FILTER (WHERE x.state = 'cancelled') AS cancelled,
           (array_agg(x.reason ORDER BY x.id DESC)
                FILTER (WHERE x.state = 'failed' AND x.reason IS NOT NULL))[1] AS last_error,
           (array_agg(x.reason ORDER BY x.id DESC) FILTER (WHERE x.state = 'skipped'))[1] AS last_skip_reason,
           max(x.finished_at) AS last_finished_at
    FROM fhir_outbox.finished_delivery x
    WHERE x.project_id = r.project_id AND x.subscription_id = r.id
) f ON true
LEFT JOIN LATERAL (
    SELECT count(*) AS issues,
           min(s.message) FILTER (WHERE s.kind = 'budget_exhausted') AS suspended_reason
    FROM fhir_outbox.subscription_issue s
    WHERE s.project_id = r.project_id AND s.subscription_id = r.id AND s.subscription_version = r.version_id
) i ON true
WHERE r.resource_type = 'Subscription' AND NOT r.deleted;

CREATE VIEW fhir_outbox.delivery_attempt_log AS
SELECT a.id AS attempt_id, a.delivery_id, a.project_id, a.subscription_id,
       d.resource_type, d.resource_id, d.version_id, d.interaction, d.webhook_id,
       a.attempt, a.started_at, a.duration_ms, a.succeeded, a.status, a.error, a.response_body,
       a.audit_event_id
FROM fhir_outbox.delivery_attempt a
JOIN fhir_outbox.delivery d ON d.id = a.delivery_id;

CREATE VIEW fhir_outbox.endpoint_health AS
WITH endpoints AS (
    SELECT DISTINCT project_id, endpoint FROM fhir_outbox.subscription_endpoint
    WHERE endpoint IS NOT NULL
    UNION
    SELECT project_id, endpoint FROM fhir_outbox.endpoint_circuit
),
load AS (
    SELECT e.project_id, e.endpoint,
           sum(d.in_flight)::bigint AS in_flight,
           sum(d.pending)::bigint AS pending,
           count(*) AS subscriptions_waiting
    FROM (SELECT project_id, subscription_id,
                 count(*) FILTER (WHERE state = 'in_flight') AS in_flight,
                 count(*) FILTER (WHERE state = 'pending') AS pending
          FROM (SELECT project_id, subscription_id, 'pending' AS state FROM fhir_outbox.unfinished_delivery
                WHERE state = 'pending'
                UNION ALL
                SELECT project_id, subscription_id, 'in_flight' FROM fhir_outbox.unfinished_delivery
                WHERE state = 'in_flight') x
          GROUP BY project_id, subscription_id) d
    JOIN fhir_outbox.subscription_endpoint e USING (project_id, subscription_id)
    GROUP BY e.project_id, e.endpoint
)
SELECT e.project_id, e.endpoint,
       coalesce(c.state, 'closed') AS state,
       coalesce(c.consecutive_failures, 0) AS consecutive_failures,
       coalesce(c.openings, 0) AS openings,
       c.opened_at, c.next_probe_at, c.last_failure, c.last_failure_at, c.last_success_at,
       coalesce(l.in_flight, 0) AS in_flight,
       coalesce(l.pending, 0) AS pending
FROM endpoints e
LEFT JOIN fhir_outbox.endpoint_circuit c USING (project_id, endpoint)
LEFT JOIN load l USING (project_id, endpoint);

-- Nobody but the roles granted them (docs/roles.sql) runs these: they create and drop tables as
-- their owner, or write AuditEvents.
REVOKE EXECUTE ON FUNCTION fhir_outbox.ensure_history_partitions(integer),
    fhir_outbox.rotate_delivery_lanes(float8, bigint, integer),
    fhir_outbox.drop_history_partitions(text, timestamptz),
    fhir_outbox.create_audit_events(uuid[], jsonb[]),
    fhir_outbox.write_delivery_view() FROM PUBLIC;
