-- A nesting limit: the store refuses what the pipeline cannot read. serde_json, which dispatch and
-- delivery decode stored resources with, gives up at 128 nested arrays and objects; a resource the
-- store accepted but dispatch cannot decode would be a change that can never be delivered. The
-- limit, 100 levels (the resource object itself is level 1), is `fhir::MAX_NESTING_DEPTH` in Rust;
-- tests/integration/nesting.rs checks that the two agree. Refused with OB001 (invalid resource),
-- like the stack-depth case below.

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
    -- `.**{100}` reaches what lies 100 steps below the resource object, so an array or object
    -- there is level 101 as serde_json counts. Strict mode, because lax mode unwraps arrays and
    -- would not count them as levels. One C-implemented walk, no deeper than the limit.
    IF jsonb_path_exists(p_resource, 'strict $.**{100} ? (@.type() == "object" || @.type() == "array")') THEN
        RAISE EXCEPTION 'resource is nested too deeply: more than 100 levels of objects and arrays'
            USING ERRCODE = 'OB001';
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

-- Changes dispatch set aside: marked dispatched with a `dispatch_error` (a content that cannot be
-- decoded, a version that is missing, a row that fails alone), so never delivered. Public API like
-- the other views (new columns only at the end).
CREATE VIEW fhir_outbox.outbox_dispatch_error AS
SELECT seq, project_id, resource_type, resource_id, version_id, interaction, changed_at,
       dispatched_at, dispatch_error
FROM fhir_outbox.outbox
WHERE dispatch_error IS NOT NULL;

-- Few rows ever have one: a small index keeps the view from scanning the outbox.
CREATE INDEX outbox_with_dispatch_error ON fhir_outbox.outbox (seq) WHERE dispatch_error IS NOT NULL;
