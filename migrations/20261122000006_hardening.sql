-- Hardening: clear errors for hostile input, and functions that run with their owner's rights so
-- that applications can be given EXECUTE on them and nothing else (see docs/roles.sql).

CREATE OR REPLACE FUNCTION fhir_outbox.checked_content(p_project uuid, p_resource jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_text  text;
    v_limit bigint := coalesce(nullif(current_setting('fhir_outbox.max_resource_bytes', true), '')::bigint, 4194304);
    v_type  text;
BEGIN
    IF p_resource IS NULL OR jsonb_typeof(p_resource) <> 'object' THEN
        RAISE EXCEPTION 'resource must be a JSON object, got %', coalesce(jsonb_typeof(p_resource), 'nothing')
            USING ERRCODE = 'OB001';
    END IF;
    v_text := p_resource::text;
    IF octet_length(v_text) > v_limit THEN
        RAISE EXCEPTION 'resource is % bytes, over the limit of % bytes (setting fhir_outbox.max_resource_bytes)',
            octet_length(v_text), v_limit
            USING ERRCODE = 'OB006', DETAIL = octet_length(v_text) || ' ' || v_limit;
    END IF;
    IF jsonb_typeof(p_resource -> 'resourceType') IS DISTINCT FROM 'string' THEN
        RAISE EXCEPTION 'resource has no resourceType string' USING ERRCODE = 'OB001';
    END IF;
    v_type := p_resource ->> 'resourceType';
    IF NOT EXISTS (SELECT 1 FROM fhir_outbox.resource_type WHERE name = v_type) THEN
        RAISE EXCEPTION 'unknown resourceType "%"', left(v_type, 100) USING ERRCODE = 'OB002';
    END IF;
    IF p_resource ? 'meta' AND jsonb_typeof(p_resource -> 'meta') <> 'object' THEN
        RAISE EXCEPTION 'meta must be a JSON object, got %', jsonb_typeof(p_resource -> 'meta')
            USING ERRCODE = 'OB001';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM fhir_outbox.project WHERE id = p_project) THEN
        RAISE EXCEPTION 'unknown project %', coalesce(p_project::text, 'NULL') USING ERRCODE = 'OB005';
    END IF;
    -- The full recursive pass is only needed when something could be empty; jsonb_strip_nulls is cheap.
    IF v_text ~ '""|\{\}|\[\]' THEN
        -- The recursive pass can exhaust the stack on absurdly deep input: name the problem.
        BEGIN
            RETURN fhir_outbox.strip_empty(jsonb_strip_nulls(p_resource));
        EXCEPTION WHEN statement_too_complex THEN
            RAISE EXCEPTION 'resource is nested too deeply' USING ERRCODE = 'OB001';
        END;
    END IF;
    RETURN jsonb_strip_nulls(p_resource);
END
$$;

-- The write and read functions run as their owner (the role that ran the migrations), with a fixed
-- search_path so a caller's objects can never stand in for ours.
ALTER FUNCTION fhir_outbox.create_resource(uuid, jsonb, text, text, text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION fhir_outbox.update_resource(uuid, text, text, jsonb, bigint, text, text, text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION fhir_outbox.delete_resource(uuid, text, text, text, text, text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION fhir_outbox.read_resource(uuid, text, text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION fhir_outbox.vread_resource(uuid, text, text, bigint)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION fhir_outbox.resource_history(uuid, text, text)
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Nobody but the roles granted below may call our functions.
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA fhir_outbox FROM PUBLIC;
