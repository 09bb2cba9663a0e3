"""The metadata fields an operator can exclude, each named by the JSON path it removes."""

from django.db import models


class MetadataField(models.TextChoices):
    IP_ADDRESS = "ip", "IP Address (ip)"
    DEVICE_NAME = "device_info.device", "Device Name (device_info.device)"
    DEVICE_MODEL = "device_info.device_model", "Device Model (device_info.device_model)"
    DEVICE_MANUFACTURER = "device_info.device_manufacturer", "Device Manufacturer (device_info.device_manufacturer)"
    BRAND = "device_info.brand", "Brand (device_info.brand)"
    PRODUCT = "device_info.product", "Product (device_info.product)"
    PLATFORM = "device_info.platform", "Platform (device_info.platform)"
    OS_VERSION = "device_info.os_version", "OS Version (device_info.os_version)"
    BUILD_IDENTIFIER = "device_info.build_identifier", "Build Identifier (device_info.build_identifier)"
    CPU_ARCHITECTURE = "device_info.cpu_architecture", "CPU Architecture (device_info.cpu_architecture)"
    SCREEN_HEIGHT = "device_info.screen_height", "Screen Height (device_info.screen_height)"
    SCREEN_WIDTH = "device_info.screen_width", "Screen Width (device_info.screen_width)"
    SCREEN_DPI = "device_info.screen_dpi", "Screen DPI (device_info.screen_dpi)"
    IS_TABLET = "device_info.is_tablet", "Is Tablet (device_info.is_tablet)"
    DEVICE_COUNTRY = "device_info.device_country", "Device Country (device_info.device_country)"
    LOCALE_COUNTRY = "device_info.locale_country", "Locale Country (device_info.locale_country)"
    LOCALE_LANGUAGE = "device_info.locale_language", "Locale Language (device_info.locale_language)"
    TIMEZONE_OFFSET = "device_info.timezone_offset", "Time Zone Offset (device_info.timezone_offset)"
    USER_AGENT = "device_info.http_header_user_agent", "User Agent (device_info.http_header_user_agent)"
    NETWORK_CARRIER = "device_info.network_carrier", "Network Carrier (device_info.network_carrier)"
    NETWORK_COUNTRY = "device_info.network_country", "Network Country (device_info.network_country)"
    NETWORK_CODE = "device_info.network_code", "Network Code (device_info.network_code)"
    NETWORK_MOBILE_COUNTRY_CODE = (
        "device_info.network_mobile_country_code",
        "Mobile Country Code (device_info.network_mobile_country_code)",
    )
    RADIO_ACCESS_TECHNOLOGY = (
        "device_info.radio_access_technology",
        "Radio Access Technology (device_info.radio_access_technology)",
    )
    SUPPORTS_TELEPHONY = "device_info.supports_telephony", "Supports Telephony (device_info.supports_telephony)"
