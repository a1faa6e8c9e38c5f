# One region's executor: its own resource group, Log Analytics workspace and
# Container Apps environment, a user-assigned identity that pulls the image
# from the shared registry, and the container app itself.

locals {
  app_name = "ca-${var.name_prefix}-${var.region}"

  # Model calls one worker process admits at once (ES_MAX_IN_FLIGHT): its
  # threads under gthread, the admission limit under gevent.
  calls_per_worker = var.worker_class == "gevent" ? var.gevent_max_in_flight : var.threads
  # What one replica serves at once (C); beyond it the replica answers 503
  # (gevent) or queues in its listen backlog (gthread).
  concurrent_requests = var.workers * local.calls_per_worker

  # The HTTP scale rule's "concurrent requests" is, in Azure's definition,
  # the requests of the past 15 s divided by 15: an arrival rate (requests/s),
  # not calls in flight. By Little's law a replica with C slots and model
  # latency L (s) completes at most C / L requests/s, so the rule must add a
  # replica before the rate per replica reaches C / L, with headroom
  # (utilisation u < 1) for the time a new replica takes to start:
  #   target = max(1, floor(u * C / L))
  # docs/deploy.md ("Scaling") derives it and says what it does not cover.
  scale_target = max(1, floor(var.scale_utilisation * local.concurrent_requests / var.model_latency_s))

  # Gunicorn gives in-flight calls graceful_timeout seconds after SIGTERM, then
  # kills its workers and exits; the platform waits a little longer before
  # SIGKILL so the master's own exit is never cut short.
  termination_grace_period_s = var.graceful_timeout_s + 5

  # Probes and model calls share gunicorn's workers. /ready and /health cost a
  # flag check, nothing else; what a probe can wait for is a free slot. Under
  # gevent a worker answers it at once, beside its model calls. Under gthread
  # (a worker accepts only as many connections as it has threads) a probe
  # waits in the listen backlog until one call ends, at worst the server-side
  # cap on one call (ES_TIMEOUT_CAP_S). So a probe's timeout outlasts that
  # cap: a busy replica answers slowly, which is a success, not a failure.
  # Failures are then only real ones: 503 while draining (answered at once)
  # or no call ending for a whole cap, i.e. a stuck replica.
  probe_timeout_s = min(240, ceil(var.timeout_cap_s) + 10)
  # Readiness: two failed probes 5 s apart take a draining replica (503 at
  # once) out of rotation within about 10 s.
  readiness_interval_s = 5
  readiness_failures   = 2
  # Liveness: a restart needs three failed probes in a row: refused (about
  # 30 s when nothing listens) or unanswered for probe_timeout_s each (3 min),
  # long after gunicorn's own worker timeout has restarted a stuck worker; a
  # busy replica answers, late, and is not restarted.
  liveness_interval_s = 10
  liveness_failures   = 3

  # Only the catalog is a file; it is mounted alone (sub_path), so the other
  # secrets (the API key, the Sentry DSN, provider keys) exist only as the
  # environment variables that name them, never as files.
  secrets_mount   = "/etc/executor-service/secrets"
  catalog_secret  = "catalog-toml"
  mount_secrets   = var.catalog_toml != null
  sentry_from_kv  = var.sentry_dsn_key_vault_secret_id != null
  sentry_by_value = !local.sentry_from_kv && nonsensitive(var.sentry_dsn != "")
  # Only the names are revealed (to build the secret and env blocks), never the values.
  provider_secret_names = nonsensitive(toset(keys(var.provider_secrets)))

  tags = merge(var.tags, { region = var.region })
}

resource "azurerm_resource_group" "this" {
  name     = "rg-${var.name_prefix}-${var.region}"
  location = var.location
  tags     = local.tags
}

resource "azurerm_log_analytics_workspace" "this" {
  name                = "log-${var.name_prefix}-${var.region}"
  location            = var.location
  resource_group_name = azurerm_resource_group.this.name
  sku                 = "PerGB2018"
  retention_in_days   = var.log_retention_days
  tags                = local.tags
}

# A workload-profiles environment with only the built-in Consumption profile:
# billed like Consumption-only, but dedicated profiles (more memory or CPU per
# replica for bigger local models) can be added later in place. An
# environment created without a profile can never get one without being
# recreated (docs/deploy.md, "Workload profile").
resource "azurerm_container_app_environment" "this" {
  name                       = "cae-${var.name_prefix}-${var.region}"
  location                   = var.location
  resource_group_name        = azurerm_resource_group.this.name
  logs_destination           = "log-analytics"
  log_analytics_workspace_id = azurerm_log_analytics_workspace.this.id
  tags                       = local.tags

  workload_profile {
    name                  = "Consumption"
    workload_profile_type = "Consumption"
  }
}

# The app pulls its image with this identity: no registry admin user and no
# registry password anywhere.
resource "azurerm_user_assigned_identity" "this" {
  name                = "id-${var.name_prefix}-${var.region}"
  location            = var.location
  resource_group_name = azurerm_resource_group.this.name
  tags                = local.tags
}

resource "azurerm_role_assignment" "acr_pull" {
  scope                = var.registry_id
  role_definition_name = "AcrPull"
  principal_id         = azurerm_user_assigned_identity.this.principal_id
  # Skips the directory lookup that fails while a new identity replicates.
  principal_type = "ServicePrincipal"
}

resource "azurerm_role_assignment" "key_vault_secrets" {
  count = var.key_vault_id == null ? 0 : 1

  scope                = var.key_vault_id
  role_definition_name = "Key Vault Secrets User"
  principal_id         = azurerm_user_assigned_identity.this.principal_id
  principal_type       = "ServicePrincipal"
}

# A new role assignment takes minutes to reach the registry and Key Vault.
# Without this wait the first revision's image pull is refused and the
# create runs until it times out (a known Container Apps problem). Replaced,
# and so waited for again, whenever a role assignment is recreated.
resource "time_sleep" "role_propagation" {
  create_duration = "${var.role_propagation_wait_s}s"

  triggers = {
    acr_pull          = azurerm_role_assignment.acr_pull.id
    key_vault_secrets = join(",", azurerm_role_assignment.key_vault_secrets[*].id)
  }
}

resource "azurerm_container_app" "this" {
  name                         = local.app_name
  container_app_environment_id = azurerm_container_app_environment.this.id
  resource_group_name          = azurerm_resource_group.this.name
  workload_profile_name        = "Consumption"
  # One revision at a time: a new image tag makes a new revision, which takes
  # the traffic once its readiness probe passes; the old one is then stopped.
  revision_mode          = "Single"
  max_inactive_revisions = 5
  tags                   = local.tags

  identity {
    type         = "UserAssigned"
    identity_ids = [azurerm_user_assigned_identity.this.id]
  }

  registry {
    server   = var.registry_login_server
    identity = azurerm_user_assigned_identity.this.id
  }

  # "tenant:key" as the app's ES_API_KEYS expects; the dispatcher is the tenant.
  secret {
    name  = "api-keys"
    value = "dispatcher:${var.api_key}"
  }

  dynamic "secret" {
    for_each = local.sentry_from_kv ? [var.sentry_dsn_key_vault_secret_id] : []
    content {
      name                = "sentry-dsn"
      identity            = azurerm_user_assigned_identity.this.id
      key_vault_secret_id = secret.value
    }
  }

  dynamic "secret" {
    for_each = local.sentry_by_value ? ["sentry-dsn"] : []
    content {
      name  = secret.value
      value = var.sentry_dsn
    }
  }

  dynamic "secret" {
    for_each = local.mount_secrets ? [local.catalog_secret] : []
    content {
      name  = secret.value
      value = var.catalog_toml
    }
  }

  dynamic "secret" {
    for_each = local.provider_secret_names
    content {
      name  = lower(replace(secret.value, "_", "-"))
      value = var.provider_secrets[secret.value]
    }
  }

  ingress {
    external_enabled           = true
    allow_insecure_connections = false
    target_port                = var.port
    # gunicorn speaks HTTP/1.1; TLS ends at the Container Apps ingress.
    transport = "http"

    traffic_weight {
      latest_revision = true
      percentage      = 100
    }

    dynamic "ip_security_restriction" {
      for_each = var.allowed_cidrs
      content {
        name             = "allow-${ip_security_restriction.key}"
        action           = "Allow"
        ip_address_range = ip_security_restriction.value
      }
    }
  }

  template {
    min_replicas                     = var.min_replicas
    max_replicas                     = var.max_replicas
    termination_grace_period_seconds = local.termination_grace_period_s

    http_scale_rule {
      name                = "request-rate"
      concurrent_requests = tostring(local.scale_target)
    }

    dynamic "volume" {
      for_each = local.mount_secrets ? ["secrets"] : []
      content {
        name         = volume.value
        storage_type = "Secret"
      }
    }

    container {
      name   = "executor"
      image  = var.image
      cpu    = var.cpu
      memory = "${var.memory_gib}Gi"

      env {
        name  = "PORT"
        value = tostring(var.port)
      }
      env {
        name  = "WEB_CONCURRENCY"
        value = tostring(var.workers)
      }
      env {
        name  = "GUNICORN_THREADS"
        value = tostring(var.threads)
      }
      env {
        name  = "GUNICORN_WORKER_CLASS"
        value = var.worker_class
      }
      env {
        name  = "GUNICORN_TIMEOUT"
        value = tostring(var.worker_timeout_s)
      }
      env {
        name  = "GUNICORN_GRACEFUL_TIMEOUT"
        value = tostring(var.graceful_timeout_s)
      }
      env {
        name  = "ES_TIMEOUT_CAP_S"
        value = tostring(var.timeout_cap_s)
      }
      env {
        name  = "ES_MAX_IN_FLIGHT"
        value = tostring(local.calls_per_worker)
      }
      env {
        name  = "ES_REGION"
        value = var.region
      }
      env {
        name  = "ES_LOG_FORMAT"
        value = "json"
      }
      env {
        name  = "ES_SENTRY_ENVIRONMENT"
        value = var.sentry_environment
      }
      env {
        name        = "ES_API_KEYS"
        secret_name = "api-keys"
      }

      dynamic "env" {
        for_each = local.sentry_from_kv || local.sentry_by_value ? ["sentry-dsn"] : []
        content {
          name        = "SENTRY_DSN"
          secret_name = env.value
        }
      }

      dynamic "env" {
        for_each = local.mount_secrets ? [local.catalog_secret] : []
        content {
          name  = "ES_CATALOG"
          value = "${local.secrets_mount}/${env.value}"
        }
      }

      dynamic "env" {
        for_each = local.provider_secret_names
        content {
          name        = env.value
          secret_name = lower(replace(env.value, "_", "-"))
        }
      }

      # The catalog file alone, at the path ES_CATALOG names.
      dynamic "volume_mounts" {
        for_each = local.mount_secrets ? ["secrets"] : []
        content {
          name     = volume_mounts.value
          path     = "${local.secrets_mount}/${local.catalog_secret}"
          sub_path = local.catalog_secret
        }
      }

      # A worker answers only after post_worker_init has loaded every model,
      # so /health passing means the process is up; allow 60 s for that.
      startup_probe {
        transport               = "HTTP"
        path                    = "/health"
        port                    = var.port
        interval_seconds        = 2
        timeout                 = 3
        failure_count_threshold = 30
      }

      # /ready turns 503 while models load and as soon as SIGTERM starts the
      # drain, so a replica leaves the rotation before it stops. See
      # probe_timeout_s above for why a busy replica passes it.
      readiness_probe {
        transport               = "HTTP"
        path                    = "/ready"
        port                    = var.port
        interval_seconds        = local.readiness_interval_s
        timeout                 = local.probe_timeout_s
        failure_count_threshold = local.readiness_failures
        success_count_threshold = 1
      }

      liveness_probe {
        transport               = "HTTP"
        path                    = "/health"
        port                    = var.port
        interval_seconds        = local.liveness_interval_s
        timeout                 = local.probe_timeout_s
        failure_count_threshold = local.liveness_failures
      }
    }
  }

  lifecycle {
    precondition {
      condition     = var.cpu >= 0.25 && var.cpu <= 2 && floor(var.cpu * 4) == var.cpu * 4
      error_message = "cpu must be 0.25 to 2 in steps of 0.25 (Consumption profile)."
    }
    precondition {
      condition     = var.memory_gib == var.cpu * 2
      error_message = "memory_gib must be twice cpu (Consumption profile)."
    }
    # With memory at twice the vCPU, this also leaves every worker at least
    # 1 GiB for its own copy of the app and of any local model.
    precondition {
      condition     = var.workers <= var.cpu * 2
      error_message = "At most two gunicorn workers per vCPU: more only queue behind each other."
    }
    precondition {
      condition     = var.min_replicas >= 0 && var.min_replicas <= var.max_replicas
      error_message = "min_replicas must be between 0 and max_replicas."
    }
    precondition {
      condition     = local.termination_grace_period_s <= 600
      error_message = "graceful_timeout_s + 5 must not exceed 600 s, the Container Apps maximum."
    }
    precondition {
      condition     = var.timeout_cap_s < var.worker_timeout_s
      error_message = "timeout_cap_s must be below worker_timeout_s, so a slow call gets a 504 before gunicorn kills its worker."
    }
    precondition {
      condition     = local.probe_timeout_s > var.timeout_cap_s
      error_message = "The probes' timeout must outlast one model call (timeout_cap_s, at most 230 s): a busy replica answers them slowly."
    }
    precondition {
      condition     = local.liveness_failures * local.probe_timeout_s > var.worker_timeout_s
      error_message = "The liveness probe must give up later than gunicorn's worker timeout."
    }
    precondition {
      condition     = var.sentry_dsn_key_vault_secret_id == null || var.key_vault_id != null
      error_message = "sentry_dsn_key_vault_secret_id needs key_vault_id: without it no identity is granted 'Key Vault Secrets User' and the secret reference fails."
    }
  }

  # The image pull and the Key Vault reference need the roles to have
  # propagated, not just to exist.
  depends_on = [time_sleep.role_propagation]
}
