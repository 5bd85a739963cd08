-- AuditEvents in batches: the delivery worker records one AuditEvent per attempt, and at thousands of
-- attempts a second, one `create_resource` call each (its checks, its own plpgsql frame, two
-- single-row inserts) was a large share of the database's work. This writes a whole batch with two
-- set-based inserts, stamped exactly as `create_resource` stamps (id, meta.versionId "1",
-- meta.lastUpdated, meta.project) and normalised the same way. AuditEvents never have outbox rows
-- (write_version's rule), so nothing is captured here.
--
-- Returns the new ids with the position of their event in the input (1-based).
CREATE FUNCTION fhir_outbox.create_audit_events(p_projects uuid[], p_events jsonb[])
RETURNS TABLE (ordinal bigint, audit_event_id text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
        SELECT e.n, e.project_id, gen_random_uuid()::text AS new_id,
               CASE WHEN e.event::text ~ '""|\{\}|\[\]'
                    THEN fhir_outbox.strip_empty(jsonb_strip_nulls(e.event))
                    ELSE jsonb_strip_nulls(e.event) END AS content
        FROM unnest(p_projects, p_events) WITH ORDINALITY AS e(project_id, event, n)),
    resources AS (
        INSERT INTO fhir_outbox.resource (project_id, resource_type, id, version_id, live_version_id,
                                          deleted, last_updated)
        SELECT i.project_id, 'AuditEvent', i.new_id, 1, 1, false, v_at FROM input i),
    versions AS (
        INSERT INTO fhir_outbox.resource_version (project_id, resource_type, id, version_id, deleted,
                                                  content, last_updated, author)
        SELECT i.project_id, 'AuditEvent', i.new_id, 1, false,
               fhir_outbox.stamped(i.content, i.project_id, i.new_id, 1, v_at, NULL), v_at, NULL
        FROM input i)
    SELECT i.n, i.new_id FROM input i ORDER BY i.n;
END
$$;

REVOKE EXECUTE ON FUNCTION fhir_outbox.create_audit_events(uuid[], jsonb[]) FROM PUBLIC;
