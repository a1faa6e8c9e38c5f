output "url" {
  description = "HTTPS base URL of this region's executor."
  value       = "https://${azurerm_container_app.this.ingress[0].fqdn}"
}

output "app_name" {
  description = "Container app name (for az containerapp commands)."
  value       = azurerm_container_app.this.name
}

output "resource_group_name" {
  description = "Resource group of this region."
  value       = azurerm_resource_group.this.name
}

output "latest_revision_name" {
  description = "Revision created by the last apply."
  value       = azurerm_container_app.this.latest_revision_name
}

output "outbound_ip_addresses" {
  description = "Addresses the executor calls remote providers from (for their allow-lists); not static without a VNet and NAT gateway (docs/deploy.md)."
  value       = azurerm_container_app.this.outbound_ip_addresses
}

output "concurrent_requests" {
  description = "Calls one replica serves at once (workers x calls per worker); the scale rule's target."
  value       = local.concurrent_requests
}

output "scale_target" {
  description = "The HTTP scale rule's target: requests/s per replica, max(1, floor(u x C / latency))."
  value       = local.scale_target
}

output "max_replicas" {
  description = "Upper bound of replicas."
  value       = var.max_replicas
}

output "models" {
  description = "Models this region serves."
  value       = var.models
}

output "identity_principal_id" {
  description = "Principal of the app's user-assigned identity (grant it more roles here)."
  value       = azurerm_user_assigned_identity.this.principal_id
}
