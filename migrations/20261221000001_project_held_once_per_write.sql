-- The foreign key from `resource` to `project` is replaced by the same guarantee paid once per
-- call (docs/performance.md, run AM's section).
--
-- The key checked every inserted `resource` row with a query of its own that locked the project
-- row FOR KEY SHARE: 3.5 ms of the ~35 ms that `create_resources` takes for 1,000 ~1 KiB Patients
-- in psql (alternated with and without the key). The lock is what makes the key safe against a
-- concurrent delete of the project, and one lock per transaction is enough: every function that
-- inserts `resource` rows now takes it once (`held_project`) before its inserts, and a project
-- that still has resources cannot be deleted, given another id or truncated away
-- (`project_kept_while_it_has_resources`, the key's NO ACTION as a trigger). A deleter's row lock
-- waits for the writers holding the project, so in READ COMMITTED its check sees what they
-- committed; a transaction reading an older snapshot could miss them, so a project is deleted or
-- re-keyed in READ COMMITTED only. Projects are never deleted by fhir-outbox itself.

ALTER TABLE fhir_outbox.resource DROP CONSTRAINT resource_project_id_fkey;

-- Locks the project for the rest of the transaction against deletion (the lock a foreign key
-- check takes), or names it as unknown.
CREATE FUNCTION fhir_outbox.held_project(p_project uuid) RETURNS void
    LANGUAGE plpgsql
    AS $$
BEGIN
    PERFORM FROM fhir_outbox.project WHERE id = p_project FOR KEY SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown project %', coalesce(p_project::text, 'NULL') USING ERRCODE = 'OB005';
    END IF;
END
$$;

CREATE FUNCTION fhir_outbox.project_kept_while_it_has_resources() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        IF EXISTS (SELECT FROM fhir_outbox.resource) THEN
            RAISE EXCEPTION 'cannot truncate fhir_outbox.project: resources still belong to projects'
                USING ERRCODE = '23503';
        END IF;
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.id = OLD.id THEN
        RETURN NEW;
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'project % can be deleted or given another id only in a READ COMMITTED transaction (this one is %)',
            OLD.id, upper(current_setting('transaction_isolation'))
            USING ERRCODE = '0A000';
    END IF;
    IF EXISTS (SELECT FROM fhir_outbox.resource WHERE project_id = OLD.id) THEN
        RAISE EXCEPTION 'project % still has resources', OLD.id USING ERRCODE = '23503';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$;

CREATE TRIGGER project_kept_while_it_has_resources BEFORE DELETE OR UPDATE OF id ON fhir_outbox.project
    FOR EACH ROW EXECUTE FUNCTION fhir_outbox.project_kept_while_it_has_resources();
CREATE TRIGGER project_kept_while_resources_exist BEFORE TRUNCATE ON fhir_outbox.project
    FOR EACH STATEMENT EXECUTE FUNCTION fhir_outbox.project_kept_while_it_has_resources();

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
    PERFORM fhir_outbox.held_project(p_project);
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
    IF v_count > 0 THEN
        PERFORM fhir_outbox.held_project(p_project);
    END IF;
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


CREATE OR REPLACE FUNCTION fhir_outbox.update_resource(p_project uuid, p_resource_type text, p_id text, p_resource jsonb, p_if_match bigint DEFAULT NULL::bigint, p_author text DEFAULT NULL::text, p_request_id text DEFAULT NULL::text, p_trace_id text DEFAULT NULL::text, OUT outcome text, OUT resource jsonb, OUT version_id bigint) RETURNS record
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
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
        PERFORM fhir_outbox.held_project(p_project);
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
$_$;
