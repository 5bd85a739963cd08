-- Time-ordered ids for the resources the server creates (docs/performance.md, runs AF and AH).
--
-- First measured in run AF and reverted: the noisy-neighbour scenario slowed with these ids. Two
-- causes, both in the claim and both also reachable with ids a client chooses in sequence, are
-- fixed by migrations 20261217000001 (each subscription's endpoint by its key) and
-- 20261218000002 (each lane of the hot table walked on its own: with ordered ids the healthy
-- subscriptions' dead entries formed one run that every step of the walk read again).
--
-- `create_resource` and `create_resources` gave each new resource a random (v4) UUID. The keys of
-- `resource` and `resource_version` begin with the id, so every create inserted into a random
-- leaf page of both primary keys, and of `finished_delivery_by_resource` when its deliveries
-- finish: as those indexes outgrow the caches, each insert reads and dirties another page (and,
-- after a checkpoint, writes it whole to the WAL), and random inserts leave pages half full. In
-- psql, 1,000 ~1 KiB Patients inserted into a copy of `resource_version` holding 60,000 took
-- 12.5 ms with v4 ids and 8.5 ms with UUIDv7 ids (the median of eight alternated statements).
--
-- A UUIDv7 (`fhir_outbox.uuid_v7`, RFC 9562) begins with the creation time in milliseconds and
-- ends with 74 random bits, so new ids land at the right edge of those indexes and are still not
-- guessable. The id reveals when the resource was created, to the millisecond, as the first
-- version's `meta.lastUpdated` does to anyone who may read it; ids a client chooses (update as
-- create) are kept as given. Existing ids are not changed.

CREATE OR REPLACE FUNCTION fhir_outbox.create_resource(p_project uuid, p_resource jsonb, p_author text DEFAULT NULL::text, p_request_id text DEFAULT NULL::text, p_trace_id text DEFAULT NULL::text, OUT outcome text, OUT resource jsonb, OUT version_id bigint) RETURNS record
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_content jsonb := fhir_outbox.checked_content(p_project, p_resource);
    v_ctx     record := fhir_outbox.checked_context(p_request_id, p_trace_id);
    v_type    text := v_content ->> 'resourceType';
    v_at      timestamptz := clock_timestamp();
    v_id      text := fhir_outbox.uuid_v7(v_at)::text;
BEGIN
    resource := fhir_outbox.stamped(v_content, p_project, v_id, 1, v_at, p_author);
    INSERT INTO fhir_outbox.resource (project_id, resource_type, id, version_id, live_version_id, deleted, last_updated)
    VALUES (p_project, v_type, v_id, 1, 1, false, v_at);
    PERFORM fhir_outbox.write_version(p_project, v_type, v_id, 1, NULL, 'create', resource, v_at,
                                      p_author, v_ctx.request_id, v_ctx.trace_id);
    outcome := 'created';
    version_id := 1;
END
$$;

CREATE OR REPLACE FUNCTION fhir_outbox.create_resources(p_project uuid, p_resources jsonb[], p_author text DEFAULT NULL::text, p_request_id text DEFAULT NULL::text, p_trace_id text DEFAULT NULL::text) RETURNS TABLE(ordinal integer, outcome text, resource jsonb, version_id bigint)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_ctx     record := fhir_outbox.checked_context(p_request_id, p_trace_id);
    v_at      timestamptz := clock_timestamp();
    v_count   integer := coalesce(cardinality(p_resources), 0);
    v_checked jsonb[];
    v_state   text;
    v_message text;
    v_detail  text;
BEGIN
    IF v_count > 10000 THEN
        RAISE EXCEPTION 'at most 10000 resources per call, got %', v_count USING ERRCODE = 'OB001';
    END IF;
    BEGIN
        -- The lookups of `checked_content`, once for the batch (an empty batch looks up nothing,
        -- as before). Their messages are never seen: any refusal is named by the fallback below.
        IF v_count > 0 AND NOT EXISTS (SELECT 1 FROM fhir_outbox.project WHERE id = p_project) THEN
            RAISE EXCEPTION 'unknown project' USING ERRCODE = 'OB005';
        END IF;
        IF EXISTS (SELECT 1 FROM unnest(p_resources) AS u(doc)
                   WHERE NOT EXISTS (SELECT 1 FROM fhir_outbox.resource_type t
                                     WHERE t.name = u.doc ->> 'resourceType')) THEN
            RAISE EXCEPTION 'unknown resourceType' USING ERRCODE = 'OB002';
        END IF;
        SELECT array_agg(fhir_outbox.checked_shape(u.doc) ORDER BY u.n) INTO v_checked
        FROM unnest(p_resources) WITH ORDINALITY AS u(doc, n);
    EXCEPTION WHEN OTHERS THEN
        -- Which one: checked again one at a time (only when the batch failed), then named.
        FOR i IN 1 .. v_count LOOP
            BEGIN
                PERFORM fhir_outbox.checked_content(p_project, p_resources[i]);
            EXCEPTION WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_message = MESSAGE_TEXT,
                                        v_detail = PG_EXCEPTION_DETAIL;
                RAISE EXCEPTION 'resource % of %: %', i, v_count, v_message
                    USING ERRCODE = v_state, DETAIL = v_detail;
            END;
        END LOOP;
        RAISE;
    END;
    RETURN QUERY
    WITH checked AS MATERIALIZED (
        SELECT u.n::integer AS n, u.doc ->> 'resourceType' AS type, fhir_outbox.uuid_v7(v_at)::text AS id,
               u.doc AS doc
        FROM unnest(v_checked) WITH ORDINALITY AS u(doc, n)),
    stamped AS MATERIALIZED (
        SELECT c.n, c.type, c.id, fhir_outbox.stamped(c.doc, p_project, c.id, 1, v_at, p_author) AS doc
        FROM checked c),
    resources AS (
        INSERT INTO fhir_outbox.resource
            (project_id, resource_type, id, version_id, live_version_id, deleted, last_updated)
        SELECT p_project, s.type, s.id, 1, 1, false, v_at FROM stamped s),
    versions AS (
        INSERT INTO fhir_outbox.resource_version
            (project_id, resource_type, id, version_id, deleted, content, last_updated, author)
        SELECT p_project, s.type, s.id, 1, false, s.doc, v_at, p_author FROM stamped s),
    -- AuditEvents never trigger subscriptions (as in write_version).
    changes AS (
        INSERT INTO fhir_outbox.outbox
            (project_id, resource_type, resource_id, version_id, previous_version_id, interaction,
             changed_at, request_id, trace_id)
        SELECT p_project, s.type, s.id, 1, NULL, 'create', v_at, v_ctx.request_id, v_ctx.trace_id
        FROM stamped s WHERE s.type <> 'AuditEvent' ORDER BY s.n)
    SELECT s.n, 'created'::text, s.doc, 1::bigint FROM stamped s ORDER BY s.n;
    IF EXISTS (SELECT 1 FROM unnest(v_checked) AS u(doc) WHERE u.doc ->> 'resourceType' = 'Subscription') THEN
        UPDATE fhir_outbox.project SET subscription_epoch = subscription_epoch + 1 WHERE id = p_project;
    END IF;
END
$$;
