-- The hot table's lanes when a transaction holds the xmin horizon (measured by `fhir-outbox bench
-- --only horizon`). Under a held horizon the index entries of claimed rows cannot be marked dead,
-- so every claim walks all of them in the lane it scans. Migration 20261203000001 moved the
-- draining lane's pending rows only when at most `p_max_moves` were left and switched lanes only
-- when dead versions outnumbered live ones: a backlog that was waiting at a switch kept both lanes
-- full of dead entries until claims had drained it, and each of those claims walked more of them
-- (drains of 20-50 s instead of 2-5 s, every few minutes). When the horizon is held since before
-- the last switch, a pass now moves up to `p_max_moves_held` pending rows out of the draining
-- lane, so that it is truncated within seconds, and switches at `p_min_dead` dead versions
-- whatever the backlog. Without a held horizon nothing changes: VACUUM keeps up, and moving a
-- backlog would only cost.

-- The transaction that made the current lane current: a snapshot older than it keeps every dead
-- version of that lane.
ALTER TABLE fhir_outbox.delivery_lane ADD COLUMN switched_xid xid8;
UPDATE fhir_outbox.delivery_lane SET switched_xid = pg_current_xact_id();
ALTER TABLE fhir_outbox.delivery_lane ALTER COLUMN switched_xid SET NOT NULL;

DROP FUNCTION fhir_outbox.rotate_delivery_lanes(float8, bigint, integer);

-- Keeps the hot table's dead row versions bounded whatever the xmin horizon (see `delivery_lane`
-- in migration 20261203000001). The horizon is "held" when the snapshot of some backend of this
-- database (or of none: a replica's feedback) is older than the transaction that made the current
-- lane current (`backend_xmin` is visible to every role).
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
                                                  OUT moved bigint, OUT truncated boolean,
                                                  OUT switched boolean, OUT horizon_held boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_current smallint;
    v_switched_at timestamptz;
    v_switched_xid xid8;
    v_other smallint;
    v_other_table text;
    v_left bigint;
    v_dead bigint;
    v_live bigint;
BEGIN
    moved := 0;
    truncated := false;
    switched := false;
    horizon_held := false;
    IF NOT pg_try_advisory_xact_lock(hashtext('fhir_outbox.delivery_lanes')) THEN
        RETURN;
    END IF;
    SELECT current, switched_at, switched_xid INTO v_current, v_switched_at, v_switched_xid
    FROM fhir_outbox.delivery_lane;
    -- Backends of this database hold its horizon, and so do those of none (a replica's feedback).
    horizon_held := EXISTS (
        SELECT 1 FROM pg_stat_activity
        WHERE backend_xmin IS NOT NULL AND age(backend_xmin) > age(v_switched_xid::xid)
          AND (datid IS NULL OR datid = (SELECT oid FROM pg_database WHERE datname = current_database())));
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

REVOKE EXECUTE ON FUNCTION fhir_outbox.rotate_delivery_lanes(float8, bigint, integer, integer)
    FROM PUBLIC;
