-- Project settings that the pipeline reads are checked when they are written, whatever writes them
-- (`create_project`, `fhir-outbox project settings --set`, or a plain UPDATE): an invalid
-- `subscriptionAutoDisable` used to be ignored at delivery time in favour of the server's triggers,
-- a silent change of behaviour. Now the write fails with OB012 naming the problem.
--
-- The shapes accepted are those `project::ProjectSettings` reads: `subscriptionAutoDisable` is an
-- array (or Medplum's form, a string holding one) of {maxConsecutiveFailures, timeWindowSeconds},
-- both integers above 0, nothing else; `redactAuditEvents` and `preCommitSubscriptionsEnabled` are
-- booleans. Other settings are not ours and are kept as they are.
CREATE FUNCTION fhir_outbox.check_project_settings() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_triggers jsonb := NEW.settings -> 'subscriptionAutoDisable';
    v_trigger  jsonb;
    v_name     text;
BEGIN
    FOREACH v_name IN ARRAY ARRAY['redactAuditEvents', 'preCommitSubscriptionsEnabled'] LOOP
        IF NEW.settings ? v_name AND jsonb_typeof(NEW.settings -> v_name) <> 'boolean' THEN
            RAISE EXCEPTION 'invalid project settings: % must be true or false, not %',
                v_name, NEW.settings -> v_name USING ERRCODE = 'OB012';
        END IF;
    END LOOP;
    IF v_triggers IS NULL THEN
        RETURN NEW;
    END IF;
    IF jsonb_typeof(v_triggers) = 'string' THEN
        BEGIN
            v_triggers := (v_triggers #>> '{}')::jsonb;
        EXCEPTION WHEN invalid_text_representation THEN
            RAISE EXCEPTION 'invalid project settings: subscriptionAutoDisable is a string that is not JSON'
                USING ERRCODE = 'OB012';
        END;
    END IF;
    IF jsonb_typeof(v_triggers) <> 'array' THEN
        RAISE EXCEPTION 'invalid project settings: subscriptionAutoDisable must be an array of {maxConsecutiveFailures, timeWindowSeconds}, not %',
            jsonb_typeof(v_triggers) USING ERRCODE = 'OB012';
    END IF;
    FOR v_trigger IN SELECT jsonb_array_elements(v_triggers) LOOP
        IF jsonb_typeof(v_trigger) <> 'object'
           OR (SELECT count(*) FROM jsonb_object_keys(v_trigger) k
               WHERE k NOT IN ('maxConsecutiveFailures', 'timeWindowSeconds')) > 0
           OR jsonb_typeof(v_trigger -> 'maxConsecutiveFailures') IS DISTINCT FROM 'number'
           OR jsonb_typeof(v_trigger -> 'timeWindowSeconds') IS DISTINCT FROM 'number'
           OR (v_trigger ->> 'maxConsecutiveFailures') !~ '^[1-9][0-9]{0,8}$'
           OR (v_trigger ->> 'timeWindowSeconds') !~ '^[1-9][0-9]{0,8}$' THEN
            RAISE EXCEPTION 'invalid project settings: subscriptionAutoDisable entry % must be {"maxConsecutiveFailures": n, "timeWindowSeconds": n} with whole numbers above 0',
                v_trigger USING ERRCODE = 'OB012';
        END IF;
    END LOOP;
    RETURN NEW;
END
$$;

CREATE TRIGGER project_settings_checked
    BEFORE INSERT OR UPDATE OF settings ON fhir_outbox.project
    FOR EACH ROW EXECUTE FUNCTION fhir_outbox.check_project_settings();
