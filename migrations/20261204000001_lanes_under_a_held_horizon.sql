-- The hot table's lanes when a transaction holds the xmin horizon (measured by `fhir-outbox bench
-- --only horizon`). Under a held horizon the index entries of claimed rows cannot be marked dead,
-- so every claim walks all of them in the lane it scans. Migration 20261203000001 moved the
-- draining lane's pending rows only when at most `p_max_moves` were left and switched lanes only
-- when dead versions outnumbered live ones: a backlog that was waiting at a switch kept both lanes
-- full of dead entries until claims had drained it, and each of those claims walked more of them
-- (drains of 20-50 s instead of 2-5 s, every few minutes). When the same snapshot has held the
-- horizon for `p_held_seconds` and since before the last switch, a pass now moves up to
-- `p_max_moves_held` pending rows out of the draining lane, so that it is truncated within
-- seconds, and switches at `p_min_dead` dead versions whatever the backlog; and the claim cursor,
-- which every claim updates, is emptied and written again once it spans more than a few pages.
-- Without a held horizon nothing changes: VACUUM keeps up, and moving a backlog would only cost
-- (a first version that counted any snapshot older than the last switch, an ANALYZE's for
-- instance, moved backlogs during ordinary drains: 877 deliveries/s instead of 3,000 at 100k).

-- The transaction that made the current lane current: a snapshot older than it keeps every dead
-- version of that lane.
ALTER TABLE fhir_outbox.delivery_lane ADD COLUMN switched_xid xid8;
UPDATE fhir_outbox.delivery_lane SET switched_xid = pg_current_xact_id();
ALTER TABLE fhir_outbox.delivery_lane ALTER COLUMN switched_xid SET NOT NULL;
-- The oldest snapshot a pass saw (`pg_stat_activity.backend_xmin`) and since when: a snapshot held
-- for a moment (a long statement, an ANALYZE) is normal, one held for `p_held_seconds` is not.
ALTER TABLE fhir_outbox.delivery_lane ADD COLUMN oldest_xmin xid,
                                      ADD COLUMN oldest_xmin_since timestamptz;

DROP FUNCTION fhir_outbox.rotate_delivery_lanes(float8, bigint, integer);

-- Keeps the hot table's dead row versions bounded whatever the xmin horizon (see `delivery_lane`
-- in migration 20261203000001). The horizon is "held" when the oldest snapshot of a backend of
-- this database (or of none: a replica's feedback; autovacuum aside) has been the same for
-- `p_held_seconds` and is older than the transaction that made the current lane current
-- (`backend_xmin` is visible to every role).
-- 1. moves pending deliveries out of the other lane into the current one: all of them when at
--    most `p_max_moves` are left (the stragglers: a paused subscription's, retries due later),
--    and, when the horizon is held, up to `p_max_moves_held` per pass whatever is left; otherwise
--    a backlog is left to the claims, which move each row as they take it;
-- 2. once the other lane holds no delivery, truncates it if it has pages (under an exclusive lock
--    on that lane alone, waited for 200 ms at most, so that no write can land in it meanwhile);
-- 3. then switches lanes if the current one became current `p_min_seconds` ago and has at least
--    `p_min_dead` dead versions and, unless the horizon is held, more dead than live ones.
-- One worker at a time; the others return at once. Moves hold the claim's lock, which claims take
-- too (a claim locking a row just moved to the other partition would fail).
CREATE FUNCTION fhir_outbox.rotate_delivery_lanes(p_min_seconds float8 DEFAULT 10,
                                                  p_min_dead bigint DEFAULT 10000,
                                                  p_max_moves integer DEFAULT 1000,
                                                  p_max_moves_held integer DEFAULT 10000,
                                                  p_held_seconds float8 DEFAULT 30,
                                                  OUT moved bigint, OUT truncated boolean,
                                                  OUT switched boolean, OUT horizon_held boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_current smallint;
    v_switched_at timestamptz;
    v_switched_xid xid8;
    v_seen_xmin xid;
    v_seen_since timestamptz;
    v_oldest xid;
    v_other smallint;
    v_other_table text;
    v_left bigint;
    v_dead bigint;
    v_live bigint;
    v_cursor record;
BEGIN
    moved := 0;
    truncated := false;
    switched := false;
    horizon_held := false;
    IF NOT pg_try_advisory_xact_lock(hashtext('fhir_outbox.delivery_lanes')) THEN
        RETURN;
    END IF;
    SELECT current, switched_at, switched_xid, oldest_xmin, oldest_xmin_since
    INTO v_current, v_switched_at, v_switched_xid, v_seen_xmin, v_seen_since
    FROM fhir_outbox.delivery_lane;
    -- Backends of this database hold its horizon, and so do those of none (a replica's feedback);
    -- autovacuum's VACUUM does not hold it back for VACUUM.
    SELECT a.backend_xmin INTO v_oldest FROM pg_stat_activity a
    WHERE a.backend_xmin IS NOT NULL AND a.pid <> pg_backend_pid()
      AND a.backend_type IS DISTINCT FROM 'autovacuum worker'
      AND (a.datid IS NULL
           OR a.datid = (SELECT oid FROM pg_database WHERE datname = current_database()))
    ORDER BY age(a.backend_xmin) DESC LIMIT 1;
    IF v_oldest IS DISTINCT FROM v_seen_xmin THEN
        UPDATE fhir_outbox.delivery_lane SET oldest_xmin = v_oldest, oldest_xmin_since = now();
    ELSE
        horizon_held := v_oldest IS NOT NULL
            AND now() - v_seen_since >= make_interval(secs => p_held_seconds)
            AND age(v_oldest) > age(v_switched_xid::xid);
    END IF;
    -- Every claim updates the one-row claim cursor, and every claim reads it: under a held
    -- horizon its dead versions pile up too (about one per claim). Kept to a few pages: emptied
    -- and written again under the claim lock, so that no claim sees it empty.
    IF horizon_held AND pg_relation_size('fhir_outbox.claim_cursor') > 65536 THEN
        PERFORM pg_advisory_xact_lock(hashtext('fhir_outbox.delivery_claim'));
        SELECT project_id, subscription_id INTO v_cursor FROM fhir_outbox.claim_cursor;
        IF FOUND THEN
            BEGIN
                PERFORM set_config('lock_timeout', '200ms', true);
                TRUNCATE fhir_outbox.claim_cursor;
                INSERT INTO fhir_outbox.claim_cursor (project_id, subscription_id)
                VALUES (v_cursor.project_id, v_cursor.subscription_id);
            EXCEPTION WHEN lock_not_available THEN
                NULL; -- someone else reads it: next pass
            END;
        END IF;
    END IF;
    v_other := 1 - v_current;
    v_other_table := 'unfinished_delivery_lane' || v_other;
    SELECT count(*) INTO v_left FROM (SELECT 1 FROM fhir_outbox.unfinished_delivery
                                      WHERE lane = v_other AND state = 'pending'
                                      LIMIT p_max_moves + 1) p;
    IF v_left > p_max_moves AND NOT horizon_held THEN
        RETURN;
    END IF;
    IF v_left > 0 THEN
        PERFORM pg_advisory_xact_lock(hashtext('fhir_outbox.delivery_claim'));
    END IF;
    WITH movable AS (
        SELECT id FROM fhir_outbox.unfinished_delivery
        WHERE lane = v_other AND state = 'pending'
        LIMIT CASE WHEN horizon_held THEN greatest(p_max_moves_held, p_max_moves) ELSE p_max_moves END
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
    IF v_dead >= p_min_dead AND (horizon_held OR v_dead > v_live)
       AND now() - v_switched_at >= make_interval(secs => p_min_seconds) THEN
        UPDATE fhir_outbox.delivery_lane
        SET current = v_other, switched_at = now(), switched_xid = pg_current_xact_id(),
            switches = switches + 1;
        switched := true;
    END IF;
END
$$;

REVOKE EXECUTE ON FUNCTION
    fhir_outbox.rotate_delivery_lanes(float8, bigint, integer, integer, float8) FROM PUBLIC;
