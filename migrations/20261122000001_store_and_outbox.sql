-- The versioned FHIR store and the transactional outbox.
--
-- Everything lives in the schema `fhir_outbox`. Applications sharing the database write resources only
-- through the functions defined here (create_resource, update_resource, delete_resource): each of them
-- writes the new version and its outbox row in the caller's transaction, so a change is captured exactly
-- once if and only if it commits. The Rust API calls the same functions, so the two paths cannot drift.

CREATE SCHEMA fhir_outbox;

-- Tenants. Every resource, outbox row and (later) subscription and delivery belongs to one project.
CREATE TABLE fhir_outbox.project (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name       text NOT NULL CHECK (name <> ''),
    -- Project settings (Medplum's Project.setting / systemSetting), a JSON object of name -> value.
    settings   jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(settings) = 'object'),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The resource types the store accepts: every concrete FHIR R4 resource type, plus Medplum's `Bot`
-- (subscriptions may deliver to `Bot/<id>` endpoints).
CREATE TABLE fhir_outbox.resource_type (
    name text PRIMARY KEY
);
INSERT INTO fhir_outbox.resource_type (name) VALUES
    ('Account'), ('ActivityDefinition'), ('AdverseEvent'), ('AllergyIntolerance'), ('Appointment'),
    ('AppointmentResponse'), ('AuditEvent'), ('Basic'), ('Binary'), ('BiologicallyDerivedProduct'),
    ('BodyStructure'), ('Bundle'), ('CapabilityStatement'), ('CarePlan'), ('CareTeam'),
    ('CatalogEntry'), ('ChargeItem'), ('ChargeItemDefinition'), ('Claim'), ('ClaimResponse'),
    ('ClinicalImpression'), ('CodeSystem'), ('Communication'), ('CommunicationRequest'), ('CompartmentDefinition'),
    ('Composition'), ('ConceptMap'), ('Condition'), ('Consent'), ('Contract'),
    ('Coverage'), ('CoverageEligibilityRequest'), ('CoverageEligibilityResponse'), ('DetectedIssue'), ('Device'),
    ('DeviceDefinition'), ('DeviceMetric'), ('DeviceRequest'), ('DeviceUseStatement'), ('DiagnosticReport'),
    ('DocumentManifest'), ('DocumentReference'), ('EffectEvidenceSynthesis'), ('Encounter'), ('Endpoint'),
    ('EnrollmentRequest'), ('EnrollmentResponse'), ('EpisodeOfCare'), ('EventDefinition'), ('Evidence'),
    ('EvidenceVariable'), ('ExampleScenario'), ('ExplanationOfBenefit'), ('FamilyMemberHistory'), ('Flag'),
    ('Goal'), ('GraphDefinition'), ('Group'), ('GuidanceResponse'), ('HealthcareService'),
    ('ImagingStudy'), ('Immunization'), ('ImmunizationEvaluation'), ('ImmunizationRecommendation'), ('ImplementationGuide'),
    ('InsurancePlan'), ('Invoice'), ('Library'), ('Linkage'), ('List'),
    ('Location'), ('Measure'), ('MeasureReport'), ('Media'), ('Medication'),
    ('MedicationAdministration'), ('MedicationDispense'), ('MedicationKnowledge'), ('MedicationRequest'), ('MedicationStatement'),
    ('MedicinalProduct'), ('MedicinalProductAuthorization'), ('MedicinalProductContraindication'), ('MedicinalProductIndication'), ('MedicinalProductIngredient'),
    ('MedicinalProductInteraction'), ('MedicinalProductManufactured'), ('MedicinalProductPackaged'), ('MedicinalProductPharmaceutical'), ('MedicinalProductUndesirableEffect'),
    ('MessageDefinition'), ('MessageHeader'), ('MolecularSequence'), ('NamingSystem'), ('NutritionOrder'),
    ('Observation'), ('ObservationDefinition'), ('OperationDefinition'), ('OperationOutcome'), ('Organization'),
    ('OrganizationAffiliation'), ('Parameters'), ('Patient'), ('PaymentNotice'), ('PaymentReconciliation'),
    ('Person'), ('PlanDefinition'), ('Practitioner'), ('PractitionerRole'), ('Procedure'),
    ('Provenance'), ('Questionnaire'), ('QuestionnaireResponse'), ('RelatedPerson'), ('RequestGroup'),
    ('ResearchDefinition'), ('ResearchElementDefinition'), ('ResearchStudy'), ('ResearchSubject'), ('RiskAssessment'),
    ('RiskEvidenceSynthesis'), ('Schedule'), ('SearchParameter'), ('ServiceRequest'), ('Slot'),
    ('Specimen'), ('SpecimenDefinition'), ('StructureDefinition'), ('StructureMap'), ('Subscription'),
    ('SubscriptionStatus'), ('Substance'), ('SubstanceNucleicAcid'), ('SubstancePolymer'), ('SubstanceProtein'),
    ('SubstanceReferenceInformation'), ('SubstanceSourceMaterial'), ('SubstanceSpecification'), ('SupplyDelivery'), ('SupplyRequest'),
    ('Task'), ('TerminologyCapabilities'), ('TestReport'), ('TestScript'), ('ValueSet'),
    ('VerificationResult'), ('VisionPrescription'),
    ('Bot');

-- One row per resource: where its history stands now.
CREATE TABLE fhir_outbox.resource (
    project_id      uuid NOT NULL REFERENCES fhir_outbox.project (id),
    resource_type   text NOT NULL,
    id              text NOT NULL,
    -- The newest version; when `deleted`, it is the deletion's tombstone version.
    version_id      bigint NOT NULL,
    -- The newest version that has content (the one a delete notification is about).
    live_version_id bigint,
    deleted         boolean NOT NULL,
    last_updated    timestamptz NOT NULL,
    PRIMARY KEY (project_id, resource_type, id)
);

-- Every version of every resource, immutable. A deletion is a version of its own, with no content.
CREATE TABLE fhir_outbox.resource_version (
    project_id    uuid NOT NULL,
    resource_type text NOT NULL,
    id            text NOT NULL,
    version_id    bigint NOT NULL,
    deleted       boolean NOT NULL,
    -- The resource exactly as stored and served, `meta` included; NULL for a deletion.
    content       jsonb,
    last_updated  timestamptz NOT NULL,
    author        text,
    PRIMARY KEY (project_id, resource_type, id, version_id),
    CHECK ((content IS NULL) = deleted)
);

CREATE FUNCTION fhir_outbox.forbid_version_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'resource versions are immutable (%/% version %)', OLD.resource_type, OLD.id, OLD.version_id
        USING ERRCODE = 'OB011';
END
$$;
CREATE TRIGGER resource_version_immutable BEFORE UPDATE ON fhir_outbox.resource_version
    FOR EACH ROW EXECUTE FUNCTION fhir_outbox.forbid_version_update();

-- The outbox: one row per committed change, written in the same transaction as the change.
CREATE TABLE fhir_outbox.outbox (
    seq                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_id          uuid NOT NULL,
    resource_type       text NOT NULL,
    resource_id         text NOT NULL,
    -- The version the change wrote (for a delete: the tombstone version).
    version_id          bigint NOT NULL,
    -- The version before the change: NULL for a create, for a PUT that creates or restores; for a delete,
    -- the last live version.
    previous_version_id bigint,
    interaction         text NOT NULL CHECK (interaction IN ('create', 'update', 'delete')),
    changed_at          timestamptz NOT NULL,
    request_id          text NOT NULL,
    -- A W3C traceparent or a UUID.
    trace_id            text NOT NULL
);

-- Error codes raised by the functions below (SQLSTATE class "OB"), mapped to typed errors in Rust:
--   OB001 invalid resource         OB002 unknown resource type   OB003 id mismatch
--   OB004 invalid id               OB005 unknown project         OB006 resource too large
--   OB007 version conflict         OB008 not found               OB009 gone (deleted)
--   OB010 invalid request context  OB011 immutable version

-- Removes what FHIR JSON may not contain and Medplum's stringify drops: null, "", {} and [] as object
-- member values, recursively (an object emptied this way is dropped too). Array elements are kept,
-- because FHIR aligns primitive arrays with their `_name` extension arrays by position.
CREATE FUNCTION fhir_outbox.strip_empty(v jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE jsonb_typeof(v)
        WHEN 'object' THEN (
            SELECT coalesce(jsonb_object_agg(key, stripped), '{}'::jsonb)
            FROM (SELECT key, fhir_outbox.strip_empty(value) AS stripped FROM jsonb_each(v)) members
            WHERE stripped NOT IN ('null'::jsonb, '""'::jsonb, '{}'::jsonb, '[]'::jsonb))
        WHEN 'array' THEN (
            SELECT jsonb_agg(fhir_outbox.strip_empty(value) ORDER BY ordinality)
            FROM jsonb_array_elements(v) WITH ORDINALITY)
        ELSE v
    END
$$;

-- The content compared to decide whether an update changes anything: the resource without the
-- fields the store sets itself.
CREATE FUNCTION fhir_outbox.without_server_meta(r jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN m = '{}'::jsonb THEN r - 'meta' ELSE jsonb_set(r, '{meta}', m) END
    FROM (SELECT coalesce(r -> 'meta', '{}'::jsonb) - '{versionId,lastUpdated,project,author}'::text[] AS m) x
$$;

-- Checks a resource body and returns it normalised (see strip_empty). Raises OB001..OB006.
CREATE FUNCTION fhir_outbox.checked_content(p_project uuid, p_resource jsonb) RETURNS jsonb
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
        RETURN fhir_outbox.strip_empty(jsonb_strip_nulls(p_resource));
    END IF;
    RETURN jsonb_strip_nulls(p_resource);
END
$$;

-- Validates the request context of a write and fills in what is missing. Raises OB010.
CREATE FUNCTION fhir_outbox.checked_context(
    p_request_id text, p_trace_id text, OUT request_id text, OUT trace_id text)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    request_id := coalesce(p_request_id, gen_random_uuid()::text);
    IF request_id = '' OR length(request_id) > 200 THEN
        RAISE EXCEPTION 'request id must be 1 to 200 characters' USING ERRCODE = 'OB010';
    END IF;
    trace_id := coalesce(p_trace_id, gen_random_uuid()::text);
    IF trace_id !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
       AND trace_id !~* '^([0-9a-f]{2}-)?[0-9a-f]{32}-[0-9a-f]{16}(-[0-9a-f]{1,2})?$' THEN
        RAISE EXCEPTION 'trace id "%" is neither a UUID nor a W3C traceparent', left(trace_id, 100)
            USING ERRCODE = 'OB010';
    END IF;
END
$$;

-- Builds the stored form of a version: the content with id and the server-managed meta fields set.
CREATE FUNCTION fhir_outbox.stamped(
    p_content jsonb, p_project uuid, p_id text, p_version bigint, p_at timestamptz, p_author text)
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_set(p_content, '{id}', to_jsonb(p_id)) || jsonb_build_object('meta',
        (coalesce(p_content -> 'meta', '{}'::jsonb) - '{versionId,lastUpdated,project,author}'::text[])
        || jsonb_build_object(
            'versionId', p_version::text,
            'lastUpdated', to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
            'project', p_project::text)
        || CASE WHEN p_author IS NULL THEN '{}'::jsonb
                ELSE jsonb_build_object('author', jsonb_build_object('reference', p_author)) END)
$$;

-- Writes one version and, unless it is an AuditEvent, its outbox row. The single place capture happens.
CREATE FUNCTION fhir_outbox.write_version(
    p_project uuid, p_type text, p_id text, p_version bigint, p_previous bigint, p_interaction text,
    p_content jsonb, p_at timestamptz, p_author text, p_request_id text, p_trace_id text)
RETURNS void LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    INSERT INTO fhir_outbox.resource_version
        (project_id, resource_type, id, version_id, deleted, content, last_updated, author)
    VALUES (p_project, p_type, p_id, p_version, p_content IS NULL, p_content, p_at, p_author);
    -- AuditEvents never trigger subscriptions (delivery itself writes them, this prevents loops).
    IF p_type <> 'AuditEvent' THEN
        INSERT INTO fhir_outbox.outbox (project_id, resource_type, resource_id, version_id,
                                        previous_version_id, interaction, changed_at, request_id, trace_id)
        VALUES (p_project, p_type, p_id, p_version, p_previous, p_interaction, p_at, p_request_id, p_trace_id);
    END IF;
END
$$;

-- Creates a resource with a new id (a UUID). Any id in the body is replaced, as FHIR create requires.
CREATE FUNCTION fhir_outbox.create_resource(
    p_project uuid, p_resource jsonb,
    p_author text DEFAULT NULL, p_request_id text DEFAULT NULL, p_trace_id text DEFAULT NULL,
    OUT outcome text, OUT resource jsonb, OUT version_id bigint)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_content jsonb := fhir_outbox.checked_content(p_project, p_resource);
    v_ctx     record := fhir_outbox.checked_context(p_request_id, p_trace_id);
    v_type    text := v_content ->> 'resourceType';
    v_id      text := gen_random_uuid()::text;
    v_at      timestamptz := clock_timestamp();
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

-- Writes a resource at a known id (FHIR update, PUT). Creates it when absent and restores it when
-- deleted; both are captured as `update` (as Medplum does). An update whose content equals the current
-- version writes and captures nothing (outcome `unchanged`). With p_if_match, the write only happens if
-- the current version is that one (OB007 otherwise, DETAIL = the current version or empty).
CREATE FUNCTION fhir_outbox.update_resource(
    p_project uuid, p_resource_type text, p_id text, p_resource jsonb, p_if_match bigint DEFAULT NULL,
    p_author text DEFAULT NULL, p_request_id text DEFAULT NULL, p_trace_id text DEFAULT NULL,
    OUT outcome text, OUT resource jsonb, OUT version_id bigint)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_content jsonb := fhir_outbox.checked_content(p_project, p_resource);
    v_ctx     record := fhir_outbox.checked_context(p_request_id, p_trace_id);
    v_current record;
    v_old     jsonb;
    v_at      timestamptz;
    v_version bigint;
    v_previous bigint;
BEGIN
    IF v_content ->> 'resourceType' <> p_resource_type THEN
        RAISE EXCEPTION 'resourceType "%" in the body does not match "%"', v_content ->> 'resourceType',
            left(p_resource_type, 100) USING ERRCODE = 'OB003';
    END IF;
    IF p_id IS NULL OR p_id !~ '^[A-Za-z0-9\-\.]{1,64}$' THEN
        RAISE EXCEPTION 'invalid resource id "%": 1 to 64 of A-Z a-z 0-9 - .', left(p_id, 100)
            USING ERRCODE = 'OB004';
    END IF;
    IF NOT v_content ? 'id' THEN
        RAISE EXCEPTION 'resource has no id; an update must carry id "%"', p_id USING ERRCODE = 'OB003';
    END IF;
    IF v_content ->> 'id' IS DISTINCT FROM p_id THEN
        RAISE EXCEPTION 'resource id "%" does not match the id "%" it is written to',
            left(v_content ->> 'id', 100), p_id USING ERRCODE = 'OB003';
    END IF;

    -- Lock the resource row; create it if it does not exist yet. A concurrent create of the same id makes
    -- the insert do nothing, and the next lock attempt then waits for that transaction.
    LOOP
        SELECT r.version_id, r.live_version_id, r.deleted INTO v_current
        FROM fhir_outbox.resource r
        WHERE r.project_id = p_project AND r.resource_type = p_resource_type AND r.id = p_id
        FOR UPDATE;
        EXIT WHEN FOUND;
        IF p_if_match IS NOT NULL THEN
            RAISE EXCEPTION 'version conflict on %/%: If-Match % but the resource does not exist',
                p_resource_type, p_id, p_if_match USING ERRCODE = 'OB007', DETAIL = '';
        END IF;
        v_at := clock_timestamp();
        INSERT INTO fhir_outbox.resource (project_id, resource_type, id, version_id, live_version_id, deleted, last_updated)
        VALUES (p_project, p_resource_type, p_id, 1, 1, false, v_at)
        ON CONFLICT DO NOTHING;
        IF FOUND THEN
            resource := fhir_outbox.stamped(v_content, p_project, p_id, 1, v_at, p_author);
            PERFORM fhir_outbox.write_version(p_project, p_resource_type, p_id, 1, NULL, 'update', resource,
                                              v_at, p_author, v_ctx.request_id, v_ctx.trace_id);
            outcome := 'created';
            version_id := 1;
            RETURN;
        END IF;
    END LOOP;

    IF p_if_match IS NOT NULL AND p_if_match <> v_current.version_id THEN
        RAISE EXCEPTION 'version conflict on %/%: If-Match % but the current version is %',
            p_resource_type, p_id, p_if_match, v_current.version_id
            USING ERRCODE = 'OB007', DETAIL = v_current.version_id::text;
    END IF;

    IF NOT v_current.deleted THEN
        SELECT v.content INTO v_old FROM fhir_outbox.resource_version v
        WHERE v.project_id = p_project AND v.resource_type = p_resource_type AND v.id = p_id
          AND v.version_id = v_current.version_id;
        IF fhir_outbox.without_server_meta(v_old) = fhir_outbox.without_server_meta(v_content) THEN
            outcome := 'unchanged';
            resource := v_old;
            version_id := v_current.version_id;
            RETURN;
        END IF;
        v_previous := v_current.version_id;
    END IF;

    v_version := v_current.version_id + 1;
    v_at := clock_timestamp();
    resource := fhir_outbox.stamped(v_content, p_project, p_id, v_version, v_at, p_author);
    UPDATE fhir_outbox.resource r
    SET version_id = v_version, live_version_id = v_version, deleted = false, last_updated = v_at
    WHERE r.project_id = p_project AND r.resource_type = p_resource_type AND r.id = p_id;
    PERFORM fhir_outbox.write_version(p_project, p_resource_type, p_id, v_version, v_previous, 'update',
                                      resource, v_at, p_author, v_ctx.request_id, v_ctx.trace_id);
    outcome := CASE WHEN v_current.deleted THEN 'restored' ELSE 'updated' END;
    version_id := v_version;
END
$$;

-- Deletes a resource: writes a tombstone version (history is kept) and captures a `delete` whose
-- previous version is the last live one. Deleting a deleted resource is a no-op (outcome
-- `already_deleted`); deleting one that never existed raises OB008.
CREATE FUNCTION fhir_outbox.delete_resource(
    p_project uuid, p_resource_type text, p_id text,
    p_author text DEFAULT NULL, p_request_id text DEFAULT NULL, p_trace_id text DEFAULT NULL,
    OUT outcome text, OUT version_id bigint)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_ctx     record := fhir_outbox.checked_context(p_request_id, p_trace_id);
    v_current record;
    v_at      timestamptz;
BEGIN
    SELECT r.version_id, r.deleted INTO v_current
    FROM fhir_outbox.resource r
    WHERE r.project_id = p_project AND r.resource_type = p_resource_type AND r.id = p_id
    FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION '%/% not found', left(p_resource_type, 100), left(p_id, 100) USING ERRCODE = 'OB008';
    END IF;
    IF v_current.deleted THEN
        outcome := 'already_deleted';
        version_id := v_current.version_id;
        RETURN;
    END IF;
    version_id := v_current.version_id + 1;
    v_at := clock_timestamp();
    UPDATE fhir_outbox.resource r
    SET version_id = delete_resource.version_id, deleted = true, last_updated = v_at
    WHERE r.project_id = p_project AND r.resource_type = p_resource_type AND r.id = p_id;
    PERFORM fhir_outbox.write_version(p_project, p_resource_type, p_id, delete_resource.version_id,
                                      v_current.version_id, 'delete', NULL, v_at, p_author,
                                      v_ctx.request_id, v_ctx.trace_id);
    outcome := 'deleted';
END
$$;

-- The current version of a resource. Raises OB008 when it never existed, OB009 when it is deleted.
CREATE FUNCTION fhir_outbox.read_resource(p_project uuid, p_resource_type text, p_id text)
RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_current record;
BEGIN
    SELECT r.deleted, v.content INTO v_current
    FROM fhir_outbox.resource r
    JOIN fhir_outbox.resource_version v USING (project_id, resource_type, id, version_id)
    WHERE r.project_id = p_project AND r.resource_type = p_resource_type AND r.id = p_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION '%/% not found', left(p_resource_type, 100), left(p_id, 100) USING ERRCODE = 'OB008';
    END IF;
    IF v_current.deleted THEN
        RAISE EXCEPTION '%/% is deleted', p_resource_type, p_id USING ERRCODE = 'OB009';
    END IF;
    RETURN v_current.content;
END
$$;

-- One version of a resource. Raises OB008 when there is no such version, OB009 for a deletion.
CREATE FUNCTION fhir_outbox.vread_resource(p_project uuid, p_resource_type text, p_id text, p_version_id bigint)
RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_version record;
BEGIN
    SELECT v.deleted, v.content INTO v_version
    FROM fhir_outbox.resource_version v
    WHERE v.project_id = p_project AND v.resource_type = p_resource_type AND v.id = p_id
      AND v.version_id = p_version_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION '%/%/_history/% not found', left(p_resource_type, 100), left(p_id, 100), p_version_id
            USING ERRCODE = 'OB008';
    END IF;
    IF v_version.deleted THEN
        RAISE EXCEPTION '%/%/_history/% is a deletion', p_resource_type, p_id, p_version_id
            USING ERRCODE = 'OB009';
    END IF;
    RETURN v_version.content;
END
$$;

-- The history of a resource, newest first (deletions have no content). Empty when it never existed.
CREATE FUNCTION fhir_outbox.resource_history(p_project uuid, p_resource_type text, p_id text)
RETURNS TABLE (version_id bigint, deleted boolean, last_updated timestamptz, author text, resource jsonb)
LANGUAGE sql STABLE AS $$
    SELECT v.version_id, v.deleted, v.last_updated, v.author, v.content
    FROM fhir_outbox.resource_version v
    WHERE v.project_id = p_project AND v.resource_type = p_resource_type AND v.id = p_id
    ORDER BY v.version_id DESC
$$;
