-- Topic-based subscriptions (the Subscriptions R5 Backport for R4): the notifications they receive
-- travel as deliveries, with two columns more, and each subscription's events are numbered here.

-- `notification`: NULL for a Medplum-style delivery (the changed resource is the body); for a
-- subscription to a topic, the kind of notification bundle it carries. `event_number`: for an
-- `event-notification`, the event's number among the subscription's events (1, 2, 3, … without
-- gaps, assigned in the dispatch transaction); for a `heartbeat`, the number of events the
-- subscription had when it was queued (its `events-since-subscription-start`); NULL otherwise.
ALTER TABLE fhir_outbox.unfinished_delivery
    ADD COLUMN notification text
        CHECK (notification IN ('handshake', 'heartbeat', 'event-notification')),
    ADD COLUMN event_number bigint;
ALTER TABLE fhir_outbox.finished_delivery
    ADD COLUMN notification text
        CHECK (notification IN ('handshake', 'heartbeat', 'event-notification')),
    ADD COLUMN event_number bigint;

-- `$events` reads a subscription's stored events by number, wherever their deliveries are.
CREATE INDEX unfinished_delivery_event ON fhir_outbox.unfinished_delivery
    (project_id, subscription_id, event_number) WHERE notification = 'event-notification';
CREATE INDEX finished_delivery_event ON fhir_outbox.finished_delivery
    (project_id, subscription_id, event_number) WHERE notification = 'event-notification';

-- One row per subscription that has had a topic notification: how many events it has had (the
-- last number given), and when it was last notified (an event or a heartbeat), which heartbeats
-- count from. A dispatcher takes the row's lock to number a batch's events, so two dispatchers
-- number one subscription's events one after the other, and a rolled-back dispatch gives its
-- numbers back with the rest of its work.
CREATE TABLE fhir_outbox.subscription_event_count (
    project_id            uuid NOT NULL,
    subscription_id       text NOT NULL,
    events_since_start    bigint NOT NULL DEFAULT 0 CHECK (events_since_start >= 0),
    last_notification_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, subscription_id)
);

-- Every delivery, wherever it is, with the columns of the former table, and the two above.
CREATE OR REPLACE VIEW fhir_outbox.delivery AS
SELECT id, webhook_id, project_id, subscription_id, outbox_seq, resource_project_id, resource_type,
       resource_id, version_id, previous_version_id, interaction, changed_at, request_id, trace_id,
       matched_at, state, attempts, next_attempt_at, NULL::timestamptz AS finished_at, reason,
       lease_token, lease_expires_at, claims, preamble_failures, last_status, replay,
       notification, event_number
FROM fhir_outbox.unfinished_delivery
UNION ALL
SELECT id, webhook_id, project_id, subscription_id, outbox_seq, resource_project_id, resource_type,
       resource_id, version_id, previous_version_id, interaction, changed_at, request_id, trace_id,
       matched_at, state, attempts, next_attempt_at, finished_at, reason,
       NULL::uuid, NULL::timestamptz, claims, preamble_failures, last_status, replay,
       notification, event_number
FROM fhir_outbox.finished_delivery;

-- As in migration 20261203000001, carrying the two new columns.
CREATE OR REPLACE FUNCTION fhir_outbox.write_delivery_view() RETURNS trigger
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
             lease_expires_at, claims, preamble_failures, last_status, replay, notification,
             event_number)
        VALUES (NEW.id, NEW.webhook_id, NEW.project_id, NEW.subscription_id, NEW.outbox_seq,
                NEW.resource_project_id, NEW.resource_type, NEW.resource_id, NEW.version_id,
                NEW.previous_version_id, NEW.interaction, NEW.changed_at, NEW.request_id,
                NEW.trace_id, NEW.matched_at, NEW.state, NEW.attempts, NEW.next_attempt_at,
                NEW.reason, NEW.lease_token, NEW.lease_expires_at, NEW.claims,
                NEW.preamble_failures, NEW.last_status, NEW.replay, NEW.notification,
                NEW.event_number);
    ELSE
        NEW.finished_at := coalesce(NEW.finished_at, now());
        NEW.lease_token := NULL;
        NEW.lease_expires_at := NULL;
        INSERT INTO fhir_outbox.finished_delivery
            (id, webhook_id, project_id, subscription_id, outbox_seq, resource_project_id,
             resource_type, resource_id, version_id, previous_version_id, interaction, changed_at,
             request_id, trace_id, matched_at, state, attempts, next_attempt_at, finished_at, reason,
             claims, preamble_failures, last_status, replay, notification, event_number)
        VALUES (NEW.id, NEW.webhook_id, NEW.project_id, NEW.subscription_id, NEW.outbox_seq,
                NEW.resource_project_id, NEW.resource_type, NEW.resource_id, NEW.version_id,
                NEW.previous_version_id, NEW.interaction, NEW.changed_at, NEW.request_id,
                NEW.trace_id, NEW.matched_at, NEW.state, NEW.attempts, NEW.next_attempt_at,
                NEW.finished_at, NEW.reason, NEW.claims, NEW.preamble_failures, NEW.last_status,
                NEW.replay, NEW.notification, NEW.event_number);
    END IF;
    RETURN NEW;
END
$$;

-- A topic is a Basic resource coded `SubscriptionTopic` (the backport's R4 representation). A
-- dispatcher compiles a project's subscriptions with its topics, so writing a topic (or deleting
-- one, whose tombstone has no content: its last live version says what it was) makes them stale,
-- as writing a Subscription does. A trigger rather than a change to write_version and
-- create_resources: it fires for Basic versions only, and covers both writers.
CREATE FUNCTION fhir_outbox.is_subscription_topic(p_content jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(p_content @> '{"code": {"coding": [{"system": "http://hl7.org/fhir/fhir-types", "code": "SubscriptionTopic"}]}}', false)
$$;

CREATE FUNCTION fhir_outbox.topic_written() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF fhir_outbox.is_subscription_topic(NEW.content)
       OR (NEW.content IS NULL AND EXISTS (
               SELECT 1 FROM fhir_outbox.resource_version v
               WHERE v.project_id = NEW.project_id AND v.resource_type = 'Basic' AND v.id = NEW.id
                 AND v.version_id = NEW.version_id - 1
                 AND fhir_outbox.is_subscription_topic(v.content))) THEN
        UPDATE fhir_outbox.project SET subscription_epoch = subscription_epoch + 1
        WHERE id = NEW.project_id;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER resource_version_topic_written AFTER INSERT ON fhir_outbox.resource_version
    FOR EACH ROW WHEN (NEW.resource_type = 'Basic')
    EXECUTE FUNCTION fhir_outbox.topic_written();

-- The outcome of a handshake decides the subscription's status, as the backport says: `requested`
-- becomes `active` when the handshake succeeded, `error` when it finally failed. In the recorder's
-- transaction (a handshake's delivery reaches finished_delivery only there, or by an operator's
-- action), through update_resource, so the status change is a version like any other. Only a
-- subscription still `requested` is changed (it may have been changed since), and a failure here
-- never fails the recording: it is logged and the subscription keeps its status.
CREATE FUNCTION fhir_outbox.handshake_finished() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_current record;
    v_status  text;
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
        RAISE WARNING 'fhir-outbox: cannot set Subscription/% to % after its handshake: %',
            NEW.subscription_id, v_status, SQLERRM;
    END;
    RETURN NULL;
END
$$;

CREATE TRIGGER finished_delivery_handshake AFTER INSERT ON fhir_outbox.finished_delivery
    FOR EACH ROW WHEN (NEW.notification = 'handshake')
    EXECUTE FUNCTION fhir_outbox.handshake_finished();

-- Heartbeats: a subscription to a topic with a heartbeat period (`backport-heartbeat-period`, in
-- seconds) that has been sent nothing for that long (no event, no heartbeat; counted from its
-- latest version when it never was) gets a `heartbeat` delivery, one at a time. Every process that
-- dispatches calls this every few seconds; one at a time does the work (the others find the lock
-- taken and return 0). Returns how many heartbeats were queued.
CREATE INDEX resource_live_subscription ON fhir_outbox.resource (project_id, id)
    WHERE resource_type = 'Subscription' AND NOT deleted;

CREATE FUNCTION fhir_outbox.queue_heartbeats() RETURNS integer
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
    SELECT array_agg(s.project_id ORDER BY s.project_id, s.id),
           array_agg(s.id ORDER BY s.project_id, s.id),
           array_agg(s.version_id ORDER BY s.project_id, s.id)
    INTO v_projects, v_subscriptions, v_versions
    FROM (
        SELECT r.project_id, r.id, r.version_id, r.last_updated,
               (SELECT (e ->> 'valueUnsignedInt')::bigint
                FROM jsonb_array_elements(v.content #> '{channel,extension}') e
                WHERE e ->> 'url' = 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-heartbeat-period'
                  AND jsonb_typeof(e -> 'valueUnsignedInt') = 'number'
                LIMIT 1) AS period
        FROM fhir_outbox.resource r
        JOIN fhir_outbox.resource_version v USING (project_id, resource_type, id, version_id)
        WHERE r.resource_type = 'Subscription' AND NOT r.deleted
          AND v.content ->> 'status' = 'active'
          AND v.content #>> '{channel,type}' = 'rest-hook'
          AND jsonb_typeof(v.content #> '{channel,extension}') = 'array') s
    LEFT JOIN fhir_outbox.subscription_event_count c
           ON c.project_id = s.project_id AND c.subscription_id = s.id
    WHERE s.period > 0
      AND greatest(c.last_notification_at, s.last_updated) <= now() - make_interval(secs => s.period)
      AND NOT EXISTS (SELECT 1 FROM fhir_outbox.subscription_pause p
                      WHERE p.project_id = s.project_id AND p.subscription_id = s.id)
      AND NOT EXISTS (SELECT 1 FROM fhir_outbox.unfinished_delivery d
                      WHERE d.project_id = s.project_id AND d.subscription_id = s.id
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
