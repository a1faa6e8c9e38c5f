output "url" {
  description = "HTTPS base URL of the dispatcher's job API."
  value       = "https://${azurerm_container_app.this.ingress[0].fqdn}"
}

output "api_keys" {
  description = "ES_API_KEYS of the dispatcher (tenant:key)."
  value       = "clients:${random_password.api_key.result}"
  sensitive   = true
}

output "database_fqdn" {
  description = "Private FQDN of the PostgreSQL server (reachable inside the dispatcher's network only)."
  value       = azurerm_postgresql_flexible_server.this.fqdn
}

output "outbound_ip_addresses" {
  description = "Addresses the dispatcher calls executors from (use them as the root's allowed_cidrs)."
  value       = azurerm_container_app.this.outbound_ip_addresses
}
