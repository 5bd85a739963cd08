-- Projects can be created from SQL: `SELECT fhir_outbox.create_project('my app')`.
--
-- OB012 (invalid project) is raised for an empty name or settings that are not a JSON object, before
-- the table's CHECK constraints would say the same less clearly.
--
-- The function runs as its caller (no SECURITY DEFINER) and is not granted to the writer role of
-- docs/roles.sql: creating tenants, and server-scope ones above all (their subscriptions see every
-- project's changes under --server-scoped-subscriptions), is the schema owner's business.
CREATE FUNCTION fhir_outbox.create_project(
    p_name text,
    p_settings jsonb DEFAULT '{}',
    p_server_scope boolean DEFAULT false
) RETURNS uuid
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_id uuid;
BEGIN
    IF p_name IS NULL OR btrim(p_name) = '' THEN
        RAISE EXCEPTION 'invalid project: the name is empty' USING ERRCODE = 'OB012';
    END IF;
    IF p_settings IS NULL OR jsonb_typeof(p_settings) <> 'object' THEN
        RAISE EXCEPTION 'invalid project: settings must be a JSON object, not %',
            coalesce(jsonb_typeof(p_settings), 'NULL') USING ERRCODE = 'OB012';
    END IF;
    INSERT INTO fhir_outbox.project (name, settings, server_scope)
    VALUES (p_name, p_settings, coalesce(p_server_scope, false))
    RETURNING id INTO v_id;
    RETURN v_id;
END
$$;

REVOKE EXECUTE ON FUNCTION fhir_outbox.create_project(text, jsonb, boolean) FROM PUBLIC;
