-- The set-based write path for batches (imports, backfills, a bulk enqueue): many resources in one
-- statement. `create_resource` per row costs its function calls and three single-row inserts per
-- resource; here each table gets one insert for the whole batch.
--
-- Every resource is checked as `create_resource` checks it (`checked_content`), gets a new id and
-- version 1 with the same `meta` stamping, and one outbox row (`create`; none for an AuditEvent),
-- in the order given, all in the caller's transaction. One bad resource fails the whole call with
-- its position in the message and nothing is written. At most 10,000 resources per call.
CREATE FUNCTION fhir_outbox.create_resources(p_project uuid, p_resources jsonb[],
                                             p_author text DEFAULT NULL,
                                             p_request_id text DEFAULT NULL,
                                             p_trace_id text DEFAULT NULL)
RETURNS TABLE (ordinal integer, outcome text, resource jsonb, version_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
        SELECT array_agg(fhir_outbox.checked_content(p_project, u.doc) ORDER BY u.n) INTO v_checked
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
        SELECT u.n::integer AS n, u.doc ->> 'resourceType' AS type, gen_random_uuid()::text AS id,
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

REVOKE EXECUTE ON FUNCTION fhir_outbox.create_resources(uuid, jsonb[], text, text, text) FROM PUBLIC;
