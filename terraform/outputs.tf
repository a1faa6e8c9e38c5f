output "executor_urls" {
  description = "HTTPS base URL of each region's executor."
  value       = { for name, m in module.executor_region : name => m.url }
}

output "dispatcher_regions" {
  description = "Each region as the dispatcher's regions file describes it (read by scripts/regions_from_terraform.py)."
  value       = local.dispatcher_regions
}

output "regions_file" {
  description = "The dispatcher's regions file (TOML): terraform output -raw regions_file > regions.toml"
  value       = local.regions_file
}

output "executor_api_keys" {
  description = "Each executor's key, by the environment variable the regions file names for it."
  value       = { for name, env in local.api_key_env : env => random_password.executor_api_key[name].result }
  sensitive   = true
}

output "registry_name" {
  description = "Container registry name (az acr build --registry ...)."
  value       = azurerm_container_registry.this.name
}

output "registry_login_server" {
  description = "Container registry login server."
  value       = azurerm_container_registry.this.login_server
}

output "image" {
  description = "Image every region runs."
  value       = local.image
}

output "executor_apps" {
  description = "Container app and resource group of each region (for az containerapp commands)."
  value = {
    for name, m in module.executor_region : name => {
      app_name            = m.app_name
      resource_group_name = m.resource_group_name
      revision            = m.latest_revision_name
    }
  }
}

output "executor_outbound_ip_addresses" {
  description = "Each region's outbound addresses, for remote providers' allow-lists. Not guaranteed static: these environments have no VNet and NAT gateway (docs/deploy.md, 'Workload profile')."
  value       = { for name, m in module.executor_region : name => m.outbound_ip_addresses }
}

output "executor_scale_targets" {
  description = "Each region's HTTP scale rule target (requests/s per replica) and what it was derived from."
  value = {
    for name, m in module.executor_region : name => {
      target              = m.scale_target
      concurrent_requests = m.concurrent_requests
      model_latency_s     = var.regions[name].model_latency_s
    }
  }
}

output "dispatcher_outbound_ip_addresses" {
  description = "The dispatcher's outbound addresses, if deployed: candidates for allowed_cidrs (as /32)."
  value       = var.dispatcher.enabled ? module.dispatcher[0].outbound_ip_addresses : null
}

output "dispatcher_url" {
  description = "HTTPS base URL of the dispatcher, if deployed."
  value       = var.dispatcher.enabled ? module.dispatcher[0].url : null
}

output "dispatcher_api_keys" {
  description = "Keys clients present to the dispatcher (tenant:key), if deployed."
  value       = var.dispatcher.enabled ? module.dispatcher[0].api_keys : null
  sensitive   = true
}
