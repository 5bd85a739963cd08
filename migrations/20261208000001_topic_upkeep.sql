-- Topic subscriptions, hardened: a handshake's outcome is applied with the rights it needs and a
-- failure to apply it is recorded where operators look; heartbeats and the dispatcher read small
-- tables of the subscriptions and topics concerned instead of every live subscription or Basic.

-- A status that cannot be set after a handshake is recorded as a subscription issue of this kind.
ALTER TABLE fhir_outbox.subscription_issue
    DROP CONSTRAINT subscription_issue_kind_check,
    ADD CONSTRAINT subscription_issue_kind_check
        CHECK (kind IN ('unsupported', 'invalid', 'evaluation_error', 'budget_exhausted',
                        'endpoint_refused', 'status_update_failed'));

-- As in migration 20261207000001, with two changes. It runs as its owner: the trigger fires in the
-- worker's transaction, and the worker role may read resources but not lock them for update. And
-- a failure is no longer only a server log line: it becomes a `status_update_failed` issue of the
-- subscription's current version (which `status`, the console and `subscription show` count), with
-- the warning kept for the log.
CREATE OR REPLACE FUNCTION fhir_outbox.handshake_finished() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_current record;
    v_status  text;
    v_message text;
BEGIN
    v_status := CASE NEW.state WHEN 'succeeded' THEN 'active' WHEN 'failed' THEN 'error' END;
    IF v_status IS NULL THEN
        RETURN NULL;
    END IF;
    BEGIN
        SELECT r.version_id, v.content INTO v_current
        FROM fhir_outbox.resource r
        JOIN fhir_outbox.resource_version v USING (project_id, resource_type, id, version_id)
        WHERE r.project_id = NEW.project_id AND r.resource_type = 'Subscription'
          AND r.id = NEW.subscription_id AND NOT r.deleted
        FOR UPDATE OF r;
        IF FOUND AND v_current.content ->> 'status' = 'requested' THEN
            PERFORM fhir_outbox.update_resource(
                NEW.project_id, 'Subscription', NEW.subscription_id,
                jsonb_set(v_current.content, '{status}', to_jsonb(v_status)),
                v_current.version_id, 'fhir-outbox', NEW.request_id, NEW.trace_id);
        END IF;
    EXCEPTION WHEN OTHERS THEN
        v_message := format('its handshake %s, but its status could not be set to %s: %s',
                            NEW.state, v_status, SQLERRM);
        RAISE WARNING 'fhir-outbox: Subscription/%: %', NEW.subscription_id, v_message;
        INSERT INTO fhir_outbox.subscription_issue
            (project_id, subscription_id, subscription_version, kind, message)
        SELECT r.project_id, r.id, r.version_id, 'status_update_failed', v_message
        FROM fhir_outbox.resource r
        WHERE r.project_id = NEW.project_id AND r.resource_type = 'Subscription'
          AND r.id = NEW.subscription_id
        ON CONFLICT (project_id, subscription_id, subscription_version, kind, message)
        DO UPDATE SET occurrences = fhir_outbox.subscription_issue.occurrences + 1, last_seen = now();
    END;
    RETURN NULL;
END
$$;

-- The live topics of each project, kept by topic_written (migration 20261207000001, restated
-- here), so that compiling a project's subscriptions reads its topics, not every Basic resource
-- it has. A Basic that stops being a topic (deleted, or rewritten as something else) leaves it
-- and makes the project's subscriptions stale, as a new or changed topic does; before, only a
-- deletion did.
CREATE TABLE fhir_outbox.subscription_topic (
    project_id uuid NOT NULL,
    id         text NOT NULL,
    PRIMARY KEY (project_id, id)
);

INSERT INTO fhir_outbox.subscription_topic (project_id, id)
SELECT r.project_id, r.id
FROM fhir_outbox.resource r
JOIN fhir_outbox.resource_version v USING (project_id, resource_type, id, version_id)
WHERE r.resource_type = 'Basic' AND NOT r.deleted AND fhir_outbox.is_subscription_topic(v.content);

-- Runs as its owner: applications write Basic resources, and need no rights on that table.
CREATE OR REPLACE FUNCTION fhir_outbox.topic_written() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF fhir_outbox.is_subscription_topic(NEW.content) THEN
        INSERT INTO fhir_outbox.subscription_topic (project_id, id)
        VALUES (NEW.project_id, NEW.id)
        ON CONFLICT DO NOTHING;
    ELSE
        DELETE FROM fhir_outbox.subscription_topic
        WHERE project_id = NEW.project_id AND id = NEW.id;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
    END IF;
    UPDATE fhir_outbox.project SET subscription_epoch = subscription_epoch + 1
    WHERE id = NEW.project_id;
    RETURN NULL;
END
$$;

-- The subscriptions heartbeats are for: live, `active`, rest-hook, with a heartbeat period
-- (`backport-heartbeat-period`, seconds, > 0). Kept by a trigger on every Subscription version, so
-- queue_heartbeats reads these rows (a handful) and not every live subscription's content (which
-- may be hundreds of thousands, read every poll of every worker).
CREATE TABLE fhir_outbox.subscription_heartbeat (
    project_id      uuid NOT NULL,
    subscription_id text NOT NULL,
    version_id      bigint NOT NULL,
    last_updated    timestamptz NOT NULL,
    period          interval NOT NULL,
    PRIMARY KEY (project_id, subscription_id)
);

-- The period of the first `backport-heartbeat-period` extension, as the dispatcher reads it: a
-- whole number of seconds, 1 to 2^31 - 1 (an unsignedInt). Anything else is NULL, never an error:
-- this runs inside every Subscription write, which an odd value must not fail (the dispatcher
-- records it as an issue of the subscription instead).
CREATE FUNCTION fhir_outbox.heartbeat_period(p_subscription jsonb) RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN seconds BETWEEN 1 AND 2147483647 AND seconds = trunc(seconds)
                THEN make_interval(secs => seconds::double precision)
           END
    -- A CASE, not an AND, so that only a number is ever cast.
    FROM (SELECT CASE WHEN jsonb_typeof(e -> 'valueUnsignedInt') = 'number'
                      THEN (e ->> 'valueUnsignedInt')::numeric
                 END AS seconds
          FROM jsonb_array_elements(
                   CASE WHEN jsonb_typeof(p_subscription #> '{channel,extension}') = 'array'
                        THEN p_subscription #> '{channel,extension}' ELSE '[]' END)
               WITH ORDINALITY AS x(e, n)
          WHERE e ->> 'url' = 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-heartbeat-period'
          ORDER BY n
          LIMIT 1) first
$$;

-- Runs as its owner: applications write Subscriptions, and need no rights on this table.
CREATE FUNCTION fhir_outbox.subscription_heartbeat_written() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_period interval;
BEGIN
    IF NEW.content ->> 'status' = 'active' AND NEW.content #>> '{channel,type}' = 'rest-hook' THEN
        v_period := fhir_outbox.heartbeat_period(NEW.content);
    END IF;
    IF v_period IS NULL THEN
        DELETE FROM fhir_outbox.subscription_heartbeat
        WHERE project_id = NEW.project_id AND subscription_id = NEW.id;
    ELSE
        INSERT INTO fhir_outbox.subscription_heartbeat AS h
            (project_id, subscription_id, version_id, last_updated, period)
        VALUES (NEW.project_id, NEW.id, NEW.version_id, NEW.last_updated, v_period)
        ON CONFLICT (project_id, subscription_id) DO UPDATE
        SET version_id = excluded.version_id, last_updated = excluded.last_updated,
            period = excluded.period
        WHERE h.version_id < excluded.version_id;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER resource_version_subscription_heartbeat AFTER INSERT ON fhir_outbox.resource_version
    FOR EACH ROW WHEN (NEW.resource_type = 'Subscription')
    EXECUTE FUNCTION fhir_outbox.subscription_heartbeat_written();

INSERT INTO fhir_outbox.subscription_heartbeat
    (project_id, subscription_id, version_id, last_updated, period)
SELECT r.project_id, r.id, r.version_id, r.last_updated, fhir_outbox.heartbeat_period(v.content)
FROM fhir_outbox.resource r
JOIN fhir_outbox.resource_version v USING (project_id, resource_type, id, version_id)
WHERE r.resource_type = 'Subscription' AND NOT r.deleted
  AND v.content ->> 'status' = 'active' AND v.content #>> '{channel,type}' = 'rest-hook'
  AND fhir_outbox.heartbeat_period(v.content) IS NOT NULL;

-- As in migration 20261207000001, reading subscription_heartbeat.
CREATE OR REPLACE FUNCTION fhir_outbox.queue_heartbeats() RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_projects      uuid[];
    v_subscriptions text[];
    v_versions      bigint[];
    v_queued        integer;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('fhir_outbox.heartbeats')) THEN
        RETURN 0;
    END IF;
    -- What is due first, read only: the writes below (and their table locks) happen only when a
    -- heartbeat is due, not at every call.
    SELECT array_agg(h.project_id ORDER BY h.project_id, h.subscription_id),
           array_agg(h.subscription_id ORDER BY h.project_id, h.subscription_id),
           array_agg(h.version_id ORDER BY h.project_id, h.subscription_id)
    INTO v_projects, v_subscriptions, v_versions
    FROM fhir_outbox.subscription_heartbeat h
    LEFT JOIN fhir_outbox.subscription_event_count c
           ON c.project_id = h.project_id AND c.subscription_id = h.subscription_id
    WHERE greatest(c.last_notification_at, h.last_updated) <= now() - h.period
      AND NOT EXISTS (SELECT 1 FROM fhir_outbox.subscription_pause p
                      WHERE p.project_id = h.project_id AND p.subscription_id = h.subscription_id)
      AND NOT EXISTS (SELECT 1 FROM fhir_outbox.unfinished_delivery d
                      WHERE d.project_id = h.project_id AND d.subscription_id = h.subscription_id
                        AND d.notification = 'heartbeat');
    IF v_projects IS NULL THEN
        RETURN 0;
    END IF;
    WITH due AS (
        SELECT * FROM unnest(v_projects, v_subscriptions, v_versions) AS due(project_id, id, version_id)),
    counted AS (
        INSERT INTO fhir_outbox.subscription_event_count AS c (project_id, subscription_id)
        SELECT project_id, id FROM due
        ON CONFLICT (project_id, subscription_id) DO UPDATE SET last_notification_at = now()
        RETURNING c.project_id, c.subscription_id, c.events_since_start)
    INSERT INTO fhir_outbox.unfinished_delivery
        (project_id, subscription_id, outbox_seq, resource_project_id, resource_type, resource_id,
         version_id, previous_version_id, interaction, changed_at, request_id, trace_id, matched_at,
         notification, event_number, lane)
    SELECT d.project_id, d.id, 0, d.project_id, 'Subscription', d.id, d.version_id, NULL, 'update',
           now(), gen_random_uuid()::text, gen_random_uuid()::text, now(),
           'heartbeat', c.events_since_start, (SELECT current FROM fhir_outbox.delivery_lane)
    FROM due d JOIN counted c ON c.project_id = d.project_id AND c.subscription_id = d.id;
    GET DIAGNOSTICS v_queued = ROW_COUNT;
    PERFORM pg_notify('fhir_outbox_delivery', '');
    RETURN v_queued;
END
$$;

DROP INDEX fhir_outbox.resource_live_subscription;

-- Nobody but the roles docs/roles.sql grants may call these (20261207000001 left its own to
-- PUBLIC).
REVOKE EXECUTE ON FUNCTION fhir_outbox.heartbeat_period(jsonb),
    fhir_outbox.subscription_heartbeat_written(), fhir_outbox.handshake_finished(),
    fhir_outbox.queue_heartbeats(), fhir_outbox.topic_written(),
    fhir_outbox.is_subscription_topic(jsonb) FROM PUBLIC;
